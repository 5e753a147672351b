//! How the backend is chosen: the probe, the BLIP_BACKEND override, and the fallback. One test function,
//! because the environment is shared by every thread of this process.

mod common;

use blip::{BackendChoice, BackendKind, Error, Node};
use common::unique_group;

#[test]
fn probe_override_and_fallback() {
    let (g, p) = unique_group();
    let build = |choice| Node::builder().group(g).port(p).backend(choice).build();

    set_backend_env(None);
    let auto = build(BackendChoice::Auto).unwrap();
    match blip::engine::uring::probe() {
        Ok(_) => assert_eq!(auto.info().backend, BackendKind::Uring, "{}", auto.info().backend_reason),
        Err(_) => assert_eq!(auto.info().backend, BackendKind::Poll, "{}", auto.info().backend_reason),
    }
    assert!(auto.info().backend_reason.contains("probe"), "{}", auto.info().backend_reason);
    drop(auto);

    // Forcing poll through the environment takes the fallback path and says why.
    set_backend_env(Some("poll"));
    let forced = build(BackendChoice::Auto).unwrap();
    assert_eq!(forced.info().backend, BackendKind::Poll);
    assert!(forced.info().backend_reason.contains("BLIP_BACKEND=poll"), "{}", forced.info().backend_reason);
    drop(forced);

    // An explicit choice in code wins over the environment.
    if blip::engine::uring::probe().is_ok() {
        let explicit = build(BackendChoice::Uring).unwrap();
        assert_eq!(explicit.info().backend, BackendKind::Uring);
    }

    set_backend_env(Some("bogus"));
    assert!(matches!(build(BackendChoice::Auto), Err(Error::BadBackendEnv(ref v)) if v == "bogus"));
    set_backend_env(None);
}

fn set_backend_env(value: Option<&str>) {
    // SAFETY: the environment is changed only between node lifetimes, while no other thread of this process
    // (this binary holds this one test; engine threads are joined when a node drops) reads it.
    unsafe {
        match value {
            Some(v) => std::env::set_var("BLIP_BACKEND", v),
            None => std::env::remove_var("BLIP_BACKEND"),
        }
    }
}

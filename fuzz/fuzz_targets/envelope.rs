//! The application envelope parser on arbitrary bytes: never panics, and what it accepts is canonical
//! (emitting the parsed envelope gives back exactly the bytes it was parsed from).
#![no_main]

use blip::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((env, payload)) = Envelope::parse(data) else { return };
    let len = data.len() - payload.len();
    assert_eq!(env.len(), len);
    assert!(env.validate().is_ok());
    let mut out = vec![0u8; len];
    assert_eq!(env.emit(&mut out), len);
    assert_eq!(&out[..], &data[..len]);
});

//! Bad configuration gets a clear error naming what to change, never a panic.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

use blip::net::{Interface, NetError};
use blip::proto::ConfigError;
use blip::{BackendChoice, Error, Node};
use common::unique_group;

fn err(b: blip::NodeBuilder) -> Error {
    match b.build() {
        Ok(_) => panic!("configuration should have been refused"),
        Err(e) => e,
    }
}

#[test]
fn unknown_interface() {
    let (g, p) = unique_group();
    let e = err(Node::builder().group(g).port(p).interface(Interface::Name("nosuchif0".into())));
    assert!(matches!(e, Error::Net(NetError::UnknownInterface(ref n)) if n == "nosuchif0"), "{e}");
    assert!(e.to_string().contains("nosuchif0"));
}

#[test]
fn unicast_address_as_group() {
    let e = err(Node::builder().group(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    assert!(matches!(e, Error::Net(NetError::NotMulticast(_))), "{e}");
    assert!(e.to_string().contains("239."), "the message should suggest a multicast group: {e}");
}

#[test]
fn port_in_use_without_reuse() {
    let (g, p) = unique_group();
    let _holder = UdpSocket::bind(("0.0.0.0", p)).unwrap();
    let e = err(Node::builder().group(g).port(p).reuse(false).backend(BackendChoice::Poll));
    assert!(matches!(e, Error::Net(NetError::AddrInUse { port }) if port == p), "{e}");
}

#[test]
fn mtu_too_small_for_the_header() {
    let (g, p) = unique_group();
    let e = err(Node::builder().group(g).port(p).mtu(100));
    assert!(matches!(e, Error::Config(ConfigError::DatagramSize(72))), "{e}");
    assert!(e.to_string().contains("MTU"), "{e}");
}

#[test]
fn nonsense_loss_probability() {
    let e = err(Node::builder().inject_loss(1.5, 1));
    assert!(matches!(e, Error::BadLoss(_)), "{e}");
}

#[test]
fn core_that_does_not_exist() {
    let (g, p) = unique_group();
    let e = err(Node::builder().group(g).port(p).backend(BackendChoice::Poll).cores(&[100_000]));
    assert!(matches!(e, Error::Pinning { core: 100_000, .. }), "{e}");
}

#[test]
fn pinning_is_reported() {
    let (g, p) = unique_group();
    let node = Node::builder().group(g).port(p).backend(BackendChoice::Poll).cores(&[0]).build().unwrap();
    assert_eq!(node.info().pinned_core, Some(0));
}

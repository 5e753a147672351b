use blip::sim::{self, LinkConfig, SimConfig};

#[test]
fn smoke() {
    for (loss, rx) in [(0.0, 1), (0.05, 4), (0.3, 16)] {
        let cfg = SimConfig {
            receivers: rx,
            receiver_downlink: LinkConfig { loss, ..LinkConfig::default() },
            ..SimConfig::default()
        };
        let r = sim::run(&cfg);
        println!("{loss} {rx} {r:?}");
        let r = r.unwrap();
        assert!(r.in_order && r.delivered == r.expected);
    }
}

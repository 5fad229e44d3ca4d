//! What any local client may send on the control socket, parsed as the broker parses it.
#![no_main]

use broker::control::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(req) = Request::parse(data) {
        // A request the broker accepts reads back as itself.
        assert_eq!(Request::parse(req.text().as_bytes()), Some(req));
    }
});

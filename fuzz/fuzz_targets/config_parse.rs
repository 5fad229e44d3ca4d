//! The virtio JSON config as `hvisor-broker` reads it: parsed and validated, from any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(loaded) => {
            let _ = loaded.config.describe();
        }
        Err(errors) => assert!(!errors.to_string().is_empty()),
    }
});

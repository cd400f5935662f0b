//! Arbitrary bytes into `codec::decode`, read as a stream of messages. It must never
//! panic, and every message it returns must encode to bytes that decode to the same
//! message, whole.
//!
//! From `vip-bgp/fuzz`: `cargo +nightly fuzz run decode -- -dict=decode.dict -max_len=4200`
//! (the dictionary holds the marker and common fields; 4200 covers the 4096-octet maximum
//! message plus the start of a next one).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vip_bgp::codec::{decode, encode, HEADER_LEN, MAX_MESSAGE_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((message, used))) = decode(rest) {
        assert!((HEADER_LEN..=MAX_MESSAGE_LEN).contains(&used) && used <= rest.len(), "consumed {used}");
        let bytes = encode(&message).expect("a decoded message encodes");
        let again = decode(&bytes).expect("an encoded message decodes");
        assert_eq!(again, Some((message, bytes.len())), "re-encoding changed the message");
        rest = &rest[used..];
    }
});

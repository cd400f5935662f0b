//! Internet checksums (RFC 1071).

use network_types::ip::Ipv4Hdr;

/// The checksum of a 20-byte IPv4 header (options are never present on headers this
/// program builds), computed with the checksum field taken as zero. Returned in network
/// order, ready to store.
#[inline(always)]
pub fn ipv4_header(h: &Ipv4Hdr) -> [u8; 2] {
    let words = [
        u16::from_be_bytes([h.vihl, h.tos]),
        u16::from_be_bytes(h.tot_len),
        u16::from_be_bytes(h.id),
        u16::from_be_bytes(h.frags),
        u16::from_be_bytes([h.ttl, h.proto]),
        u16::from_be_bytes([h.src_addr[0], h.src_addr[1]]),
        u16::from_be_bytes([h.src_addr[2], h.src_addr[3]]),
        u16::from_be_bytes([h.dst_addr[0], h.dst_addr[1]]),
        u16::from_be_bytes([h.dst_addr[2], h.dst_addr[3]]),
    ];
    let mut sum: u32 = 0;
    for w in words {
        sum += w as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// The one's-complement sum of `data` as 16-bit big-endian words, unfolded (an odd
/// last byte is padded with zero).
#[inline(always)]
pub fn sum16(data: &[u8]) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    if i < data.len() {
        sum += (data[i] as u32) << 8;
    }
    sum
}

/// Folds a sum from [`sum16`] into the checksum to store (host order).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

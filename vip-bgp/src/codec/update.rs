//! UPDATE (RFC 4271 §4.3): withdrawn IPv4 prefixes, path attributes, announced IPv4
//! prefixes (NLRI).
//!
//! We build two kinds: an announcement (ORIGIN IGP, AS_PATH of our AS alone, NEXT_HOP)
//! and a withdrawal. What a router sends us is framed strictly and then dropped, so path
//! attributes are kept as opaque flags/type/value triples.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{DecodeError, EncodeError, Reader, AS_TRANS, HEADER_LEN};

/// Octets in an UPDATE with nothing in it: header (19), Withdrawn Routes Length (2),
/// Total Path Attribute Length (2).
pub(super) const MIN_LEN: usize = HEADER_LEN + 4;

/// Prefixes per UPDATE we build. A prefix takes at most 5 octets on the wire, so 500
/// take at most 2500: with the 23-octet minimum and our at most 27 octets of attributes that
/// stays well inside the 4096-octet limit.
const PREFIXES_PER_UPDATE: usize = 500;

/// Attribute flags (RFC 4271 §4.3).
pub const FLAG_OPTIONAL: u8 = 0x80;
pub const FLAG_TRANSITIVE: u8 = 0x40;
pub const FLAG_PARTIAL: u8 = 0x20;
pub const FLAG_EXTENDED_LENGTH: u8 = 0x10;

/// Attribute type codes (RFC 4271 §5.1, RFC 6793 §3).
pub const ORIGIN: u8 = 1;
pub const AS_PATH: u8 = 2;
pub const NEXT_HOP: u8 = 3;
pub const AS4_PATH: u8 = 17;
/// ORIGIN value IGP: the route was originated inside our AS (RFC 4271 §5.1.1).
pub const ORIGIN_IGP: u8 = 0;
/// AS_PATH segment type AS_SEQUENCE: an ordered list of ASes (RFC 4271 §4.3).
pub const AS_SEQUENCE: u8 = 2;

/// How AS numbers are written in AS_PATH (RFC 6793 §4): four octets when both sides
/// advertised the 4-octet AS capability, else two, with [`AS_TRANS`] standing in for an AS
/// that does not fit and the real path in AS4_PATH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsPathEncoding {
    FourOctet,
    TwoOctet,
}

/// One path attribute as on the wire: flags, type code and value. The Extended Length
/// flag decides whether the length is written in one octet or two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathAttribute {
    pub flags: u8,
    pub type_code: u8,
    pub value: Vec<u8>,
}

/// An UPDATE message's body.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Update {
    /// Withdrawn Routes, host bits cleared.
    pub withdrawn_routes: Vec<Ipv4Net>,
    pub path_attributes: Vec<PathAttribute>,
    /// Network Layer Reachability Information: announced prefixes, host bits cleared.
    pub nlri: Vec<Ipv4Net>,
}

impl Update {
    /// UPDATEs announcing `prefixes` as originated by `local_as` (ORIGIN IGP, AS_PATH one
    /// AS_SEQUENCE holding `local_as`) with `next_hop` as NEXT_HOP, as many messages as it
    /// takes to stay under 4096 octets. Nothing for no prefixes.
    pub fn announce(prefixes: &[Ipv4Net], local_as: u32, next_hop: Ipv4Addr, encoding: AsPathEncoding) -> Vec<Self> {
        let attributes = announcement_attributes(local_as, next_hop, encoding);
        prefixes
            .chunks(PREFIXES_PER_UPDATE)
            .map(|chunk| Self {
                withdrawn_routes: Vec::new(),
                path_attributes: attributes.clone(),
                nlri: chunk.iter().map(Ipv4Net::trunc).collect(),
            })
            .collect()
    }

    /// UPDATEs withdrawing `prefixes` (no attributes, RFC 4271 §4.3), as many as it takes.
    pub fn withdraw(prefixes: &[Ipv4Net]) -> Vec<Self> {
        prefixes
            .chunks(PREFIXES_PER_UPDATE)
            .map(|chunk| Self { withdrawn_routes: chunk.iter().map(Ipv4Net::trunc).collect(), ..Self::default() })
            .collect()
    }

    pub(super) fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mut withdrawn = Vec::new();
        self.withdrawn_routes.iter().for_each(|p| encode_prefix(p, &mut withdrawn));
        put_section(out, &withdrawn)?;
        let mut attributes = Vec::new();
        for attribute in &self.path_attributes {
            attribute.encode(&mut attributes)?;
        }
        put_section(out, &attributes)?;
        self.nlri.iter().for_each(|p| encode_prefix(p, out));
        Ok(())
    }
}

/// ORIGIN, AS_PATH (plus AS4_PATH when needed), NEXT_HOP, in type-code order as
/// RFC 4271 §5 recommends.
fn announcement_attributes(local_as: u32, next_hop: Ipv4Addr, encoding: AsPathEncoding) -> Vec<PathAttribute> {
    let well_known = FLAG_TRANSITIVE;
    let mut attributes = vec![PathAttribute { flags: well_known, type_code: ORIGIN, value: vec![ORIGIN_IGP] }];
    let four_octet_segment = |asn: u32| {
        let mut v = vec![AS_SEQUENCE, 1];
        v.extend_from_slice(&asn.to_be_bytes());
        v
    };
    match (encoding, u16::try_from(local_as)) {
        (AsPathEncoding::FourOctet, _) => attributes.push(PathAttribute {
            flags: well_known,
            type_code: AS_PATH,
            value: four_octet_segment(local_as),
        }),
        (AsPathEncoding::TwoOctet, Ok(asn)) => {
            let mut value = vec![AS_SEQUENCE, 1];
            value.extend_from_slice(&asn.to_be_bytes());
            attributes.push(PathAttribute { flags: well_known, type_code: AS_PATH, value });
        }
        (AsPathEncoding::TwoOctet, Err(_)) => {
            let mut value = vec![AS_SEQUENCE, 1];
            value.extend_from_slice(&AS_TRANS.to_be_bytes());
            attributes.push(PathAttribute { flags: well_known, type_code: AS_PATH, value });
        }
    }
    attributes.push(PathAttribute { flags: well_known, type_code: NEXT_HOP, value: next_hop.octets().to_vec() });
    if encoding == AsPathEncoding::TwoOctet && local_as > u32::from(u16::MAX) {
        attributes.push(PathAttribute {
            flags: FLAG_OPTIONAL | FLAG_TRANSITIVE,
            type_code: AS4_PATH,
            value: four_octet_segment(local_as),
        });
    }
    attributes
}

impl PathAttribute {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let too_long = EncodeError::AttributeTooLong { type_code: self.type_code, length: self.value.len() };
        out.push(self.flags);
        out.push(self.type_code);
        if self.flags & FLAG_EXTENDED_LENGTH != 0 {
            out.extend_from_slice(&u16::try_from(self.value.len()).map_err(|_| too_long)?.to_be_bytes());
        } else {
            out.push(u8::try_from(self.value.len()).map_err(|_| too_long)?);
        }
        out.extend_from_slice(&self.value);
        Ok(())
    }
}

/// A 2-octet length then the section itself.
fn put_section(out: &mut Vec<u8>, section: &[u8]) -> Result<(), EncodeError> {
    let len =
        u16::try_from(section.len()).map_err(|_| EncodeError::MessageTooLong { length: out.len() + section.len() })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(section);
    Ok(())
}

/// Prefix length in bits, then the fewest octets that hold it (RFC 4271 §4.3).
fn encode_prefix(prefix: &Ipv4Net, out: &mut Vec<u8>) {
    let len = prefix.prefix_len();
    out.push(len);
    out.extend_from_slice(&prefix.network().octets()[..usize::from(len).div_ceil(8)]);
}

/// Decodes an UPDATE body (after the header, which guaranteed at least 4 octets).
pub(super) fn decode(body: &[u8]) -> Result<Update, DecodeError> {
    let mut r = Reader::new(body);
    let too_long = |detail| DecodeError::MalformedAttributeList { detail };
    let withdrawn_len = r.u16().ok_or(too_long("no Withdrawn Routes Length"))?;
    let withdrawn =
        r.take(usize::from(withdrawn_len)).ok_or(too_long("Withdrawn Routes Length exceeds the message"))?;
    let attributes_len = r.u16().ok_or(too_long("Withdrawn Routes Length leaves no Total Path Attribute Length"))?;
    let attributes =
        r.take(usize::from(attributes_len)).ok_or(too_long("Total Path Attribute Length exceeds the message"))?;
    Ok(Update {
        withdrawn_routes: decode_prefixes(withdrawn)?,
        path_attributes: decode_attributes(attributes)?,
        nlri: decode_prefixes(r.rest())?,
    })
}

fn decode_attributes(bytes: &[u8]) -> Result<Vec<PathAttribute>, DecodeError> {
    let malformed = DecodeError::MalformedAttributeList { detail: "path attribute runs past the attributes" };
    let mut r = Reader::new(bytes);
    let mut attributes = Vec::new();
    while !r.is_empty() {
        let flags = r.u8().ok_or(malformed.clone())?;
        let type_code = r.u8().ok_or(malformed.clone())?;
        let len = if flags & FLAG_EXTENDED_LENGTH != 0 { r.u16().map(usize::from) } else { r.u8().map(usize::from) };
        let value = len.and_then(|len| r.take(len)).ok_or(malformed.clone())?;
        attributes.push(PathAttribute { flags, type_code, value: value.to_vec() });
    }
    Ok(attributes)
}

fn decode_prefixes(bytes: &[u8]) -> Result<Vec<Ipv4Net>, DecodeError> {
    let mut r = Reader::new(bytes);
    let mut prefixes = Vec::new();
    while let Some(len) = r.u8() {
        if len > 32 {
            return Err(DecodeError::InvalidNetworkField { detail: "IPv4 prefix length over 32" });
        }
        let octets = r
            .take(usize::from(len).div_ceil(8))
            .ok_or(DecodeError::InvalidNetworkField { detail: "IPv4 prefix runs past its field" })?;
        let mut address = [0u8; 4];
        address[..octets.len()].copy_from_slice(octets);
        // Trailing bits past the prefix length are irrelevant (RFC 4271 §4.3).
        let prefix = Ipv4Net::new(Ipv4Addr::from(address), len)
            .map_err(|_| DecodeError::InvalidNetworkField { detail: "IPv4 prefix length over 32" })?;
        prefixes.push(prefix.trunc());
    }
    Ok(prefixes)
}

#[cfg(test)]
mod tests {
    use super::super::{decode as decode_message, encode, Message, MARKER};
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn update_bytes(body: &[u8]) -> Vec<u8> {
        let mut out = MARKER.to_vec();
        out.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        out.push(2);
        out.extend_from_slice(body);
        out
    }

    fn roundtrip(update: Update) -> Vec<u8> {
        let message = Message::Update(update);
        let bytes = encode(&message).unwrap();
        assert_eq!(decode_message(&bytes).unwrap(), Some((message, bytes.len())));
        bytes
    }

    #[test]
    fn an_announcement_carries_origin_igp_a_four_octet_as_path_and_the_next_hop() {
        let updates =
            Update::announce(&[net("192.0.2.10/32")], 65000, Ipv4Addr::new(10, 0, 0, 2), AsPathEncoding::FourOctet);
        assert_eq!(updates.len(), 1);
        let bytes = roundtrip(updates[0].clone());
        #[rustfmt::skip]
        let body = [
            0, 0,                                  // no withdrawn routes
            0, 20,                                 // 20 octets of attributes
            0x40, 1, 1, 0,                         // ORIGIN IGP
            0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe8,    // AS_PATH: AS_SEQUENCE [65000]
            0x40, 3, 4, 10, 0, 0, 2,               // NEXT_HOP 10.0.0.2
            32, 192, 0, 2, 10,                     // NLRI 192.0.2.10/32
        ];
        assert_eq!(&bytes[19..], &body);
    }

    #[test]
    fn a_two_octet_peer_gets_as_trans_in_as_path_and_the_real_as_in_as4_path() {
        let update = Update::announce(
            &[net("192.0.2.10/32")],
            4_200_000_001,
            Ipv4Addr::new(10, 0, 0, 2),
            AsPathEncoding::TwoOctet,
        )
        .remove(0);
        let as_path = &update.path_attributes[1];
        assert_eq!((as_path.type_code, as_path.value.as_slice()), (AS_PATH, &[2, 1, 0x5b, 0xa0][..]));
        let as4_path = &update.path_attributes[3];
        assert_eq!(as4_path.flags, FLAG_OPTIONAL | FLAG_TRANSITIVE);
        assert_eq!((as4_path.type_code, as4_path.value.as_slice()), (AS4_PATH, &[2, 1, 0xfa, 0x56, 0xea, 0x01][..]));
        roundtrip(update);
    }

    #[test]
    fn a_two_octet_peer_with_a_small_as_gets_a_plain_two_octet_as_path() {
        let update =
            Update::announce(&[net("192.0.2.10/32")], 65000, Ipv4Addr::new(10, 0, 0, 2), AsPathEncoding::TwoOctet)
                .remove(0);
        assert_eq!(update.path_attributes.len(), 3);
        assert_eq!(update.path_attributes[1].value, vec![2, 1, 0xfd, 0xe8]);
    }

    #[test]
    fn a_withdrawal_lists_the_prefixes_with_no_attributes() {
        let update = Update::withdraw(&[net("192.0.2.10/32"), net("10.0.0.0/8")]).remove(0);
        let bytes = roundtrip(update);
        assert_eq!(&bytes[19..], &[0, 7, 32, 192, 0, 2, 10, 8, 10, 0, 0]);
    }

    #[test]
    fn host_bits_are_cleared_and_a_zero_length_prefix_takes_one_octet() {
        let update = Update::withdraw(&[net("10.1.2.3/8"), net("0.0.0.0/0"), net("10.1.2.3/20")]).remove(0);
        assert_eq!(update.withdrawn_routes, vec![net("10.0.0.0/8"), net("0.0.0.0/0"), net("10.1.0.0/20")]);
        let bytes = roundtrip(update);
        assert_eq!(&bytes[19..], &[0, 7, 8, 10, 0, 20, 10, 1, 0, 0, 0]);
        // Received trailing bits are ignored the same way.
        let received = decode_message(&update_bytes(&[0, 2, 4, 0xff, 0, 0])).unwrap().unwrap().0;
        assert_eq!(
            received,
            Message::Update(Update { withdrawn_routes: vec![net("240.0.0.0/4")], ..Update::default() })
        );
    }

    #[test]
    fn many_prefixes_are_split_over_updates_that_each_fit() {
        let prefixes: Vec<Ipv4Net> =
            (0..1200u32).map(|i| Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap()).collect();
        let announcements = Update::announce(&prefixes, 65000, Ipv4Addr::new(10, 0, 0, 2), AsPathEncoding::FourOctet);
        let withdrawals = Update::withdraw(&prefixes);
        for updates in [announcements, withdrawals] {
            assert_eq!(updates.len(), 3);
            let mut seen = Vec::new();
            for update in updates {
                roundtrip(update.clone());
                seen.extend(update.nlri);
                seen.extend(update.withdrawn_routes);
            }
            assert_eq!(seen, prefixes);
        }
    }

    #[test]
    fn extended_length_attributes_keep_their_two_octet_length() {
        let update = Update {
            path_attributes: vec![PathAttribute { flags: 0xd0, type_code: 99, value: vec![7; 300] }],
            ..Update::default()
        };
        let bytes = roundtrip(update);
        assert_eq!(&bytes[23..27], &[0xd0, 99, 0x01, 0x2c]);
    }

    #[test]
    fn an_attribute_too_long_for_its_length_field_is_not_encoded() {
        let update = Update {
            path_attributes: vec![PathAttribute { flags: 0x40, type_code: 99, value: vec![7; 256] }],
            ..Update::default()
        };
        assert_eq!(
            encode(&Message::Update(update)).unwrap_err(),
            EncodeError::AttributeTooLong { type_code: 99, length: 256 }
        );
    }

    #[test]
    fn section_lengths_past_the_message_are_malformed_attribute_list() {
        for body in [&[0u8, 5, 0, 0][..], &[0, 0, 0, 1], &[0, 2, 8, 10]] {
            let err = decode_message(&update_bytes(body)).unwrap_err();
            assert!(matches!(err, DecodeError::MalformedAttributeList { .. }), "{body:?}: {err:?}");
            assert_eq!((err.notification().code, err.notification().subcode), (3, 1));
        }
    }

    #[test]
    fn an_attribute_running_past_the_attributes_is_malformed_attribute_list() {
        for attrs in [&[0x40u8][..], &[0x40, 1], &[0x40, 1, 2, 0], &[0x50, 1, 0]] {
            let mut body = vec![0, 0, 0, attrs.len() as u8];
            body.extend_from_slice(attrs);
            let err = decode_message(&update_bytes(&body)).unwrap_err();
            assert!(matches!(err, DecodeError::MalformedAttributeList { .. }), "{attrs:?}: {err:?}");
        }
    }

    #[test]
    fn a_bad_prefix_is_invalid_network_field() {
        // NLRI prefix length 33, then one running past the end; same in withdrawn routes.
        for body in [&[0u8, 0, 0, 0, 33, 1, 2, 3, 4, 5][..], &[0, 0, 0, 0, 24, 10, 0], &[0, 2, 9, 10, 0, 0]] {
            let err = decode_message(&update_bytes(body)).unwrap_err();
            assert!(matches!(err, DecodeError::InvalidNetworkField { .. }), "{body:?}: {err:?}");
            assert_eq!((err.notification().code, err.notification().subcode), (3, 10));
        }
    }
}

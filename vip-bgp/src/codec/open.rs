//! OPEN (RFC 4271 §4.2) with Capabilities (RFC 5492): the first message on a connection,
//! carrying version, AS, hold time, BGP Identifier and what each side supports.
//!
//! Only the syntax is checked here. Whether the peer's AS, identifier and hold time are
//! acceptable depends on the configuration and is decided by the session
//! ([`crate::session`]).

use std::net::Ipv4Addr;

use super::{DecodeError, EncodeError, Reader, AS_TRANS, BGP_VERSION, HEADER_LEN};

/// Octets in an OPEN without optional parameters: header (19), version (1), My
/// Autonomous System (2), Hold Time (2), BGP Identifier (4), Opt Parm Len (1).
pub(super) const MIN_LEN: usize = HEADER_LEN + 10;

/// Optional parameter type "Capabilities" (RFC 5492 §4), the only one RFC 4271 peers use.
const PARAM_CAPABILITIES: u8 = 2;
/// Capability codes (IANA "Capability Codes").
const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_FOUR_OCTET_AS: u8 = 65;
/// AFI 1 (IPv4) and SAFI 1 (unicast) (RFC 4760 §5; IANA).
pub const AFI_IPV4: u16 = 1;
pub const SAFI_UNICAST: u8 = 1;

/// One capability from an OPEN's Capabilities optional parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Multiprotocol Extensions (code 1, RFC 4760 §8): one AFI/SAFI pair the sender can
    /// exchange. The reserved octet is sent as zero and ignored on receipt.
    Multiprotocol { afi: u16, safi: u8 },
    /// Support for 4-octet AS numbers (code 65, RFC 6793 §3), carrying the sender's AS.
    FourOctetAs { asn: u32 },
    /// Any other capability, kept as received: code and value. Codes 1 and 65 are always
    /// decoded as the variants above.
    Unknown { code: u8, value: Vec<u8> },
}

/// An OPEN message's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// My Autonomous System: the sender's AS if it fits in 2 octets, else [`AS_TRANS`].
    pub my_as: u16,
    /// Proposed hold time in seconds: 0 (no keepalives) or at least 3 (RFC 4271 §4.2).
    pub hold_time: u16,
    /// BGP Identifier, the sender's router id.
    pub bgp_identifier: Ipv4Addr,
    /// Capabilities in the order received, flattened over all Capabilities parameters.
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// Our OPEN: version 4, `local_as` (2-octet field [`AS_TRANS`] when it does not fit),
    /// hold time in seconds, our router id, and the capabilities of an announce-only
    /// IPv4 speaker: Multiprotocol IPv4 unicast and 4-octet AS. Deliberately no Graceful
    /// Restart (RFC 4724): when we leave, the router must drop our routes at once.
    pub fn new(local_as: u32, hold_time: u16, bgp_identifier: Ipv4Addr) -> Self {
        Self {
            my_as: u16::try_from(local_as).unwrap_or(AS_TRANS),
            hold_time,
            bgp_identifier,
            capabilities: vec![
                Capability::Multiprotocol { afi: AFI_IPV4, safi: SAFI_UNICAST },
                Capability::FourOctetAs { asn: local_as },
            ],
        }
    }

    /// The AS from the first 4-octet AS capability, if the sender advertised one.
    pub fn four_octet_as(&self) -> Option<u32> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::FourOctetAs { asn } => Some(*asn),
            _ => None,
        })
    }

    /// The sender's AS: the 4-octet AS capability's if present (RFC 6793 §4.1), else the
    /// 2-octet My Autonomous System field.
    pub fn peer_as(&self) -> u32 {
        self.four_octet_as().unwrap_or(u32::from(self.my_as))
    }

    pub(super) fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.push(BGP_VERSION);
        out.extend_from_slice(&self.my_as.to_be_bytes());
        out.extend_from_slice(&self.hold_time.to_be_bytes());
        out.extend_from_slice(&self.bgp_identifier.octets());
        let caps = encode_capabilities(&self.capabilities)?;
        if caps.is_empty() {
            out.push(0);
            return Ok(());
        }
        // All capabilities go in one Capabilities parameter (RFC 5492 §4 allows either
        // form), so anything we decoded fits again in the 255-octet parameters field.
        let params_len = caps.len() + 2;
        let params_len_octet =
            u8::try_from(params_len).map_err(|_| EncodeError::OptionalParametersTooLong { length: params_len })?;
        out.push(params_len_octet);
        out.push(PARAM_CAPABILITIES);
        out.push(params_len_octet - 2);
        out.extend_from_slice(&caps);
        Ok(())
    }
}

fn encode_capabilities(capabilities: &[Capability]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    for capability in capabilities {
        match capability {
            Capability::Multiprotocol { afi, safi } => {
                out.extend_from_slice(&[CAP_MULTIPROTOCOL, 4]);
                out.extend_from_slice(&afi.to_be_bytes());
                out.extend_from_slice(&[0, *safi]);
            }
            Capability::FourOctetAs { asn } => {
                out.extend_from_slice(&[CAP_FOUR_OCTET_AS, 4]);
                out.extend_from_slice(&asn.to_be_bytes());
            }
            Capability::Unknown { code, value } => {
                let len = u8::try_from(value.len())
                    .map_err(|_| EncodeError::CapabilityTooLong { code: *code, length: value.len() })?;
                out.extend_from_slice(&[*code, len]);
                out.extend_from_slice(value);
            }
        }
    }
    Ok(out)
}

/// Decodes an OPEN body (after the header, which guaranteed at least 10 octets).
pub(super) fn decode(body: &[u8]) -> Result<Open, DecodeError> {
    let &[version, as0, as1, hold0, hold1, id0, id1, id2, id3, params_len, ref params @ ..] = body else {
        let length = u16::try_from(HEADER_LEN + body.len()).unwrap_or(u16::MAX);
        return Err(DecodeError::BadLength { length });
    };
    if version != BGP_VERSION {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    if params.len() != usize::from(params_len) {
        return Err(DecodeError::MalformedOptionalParameters {
            length: usize::from(params_len),
            available: params.len(),
        });
    }
    Ok(Open {
        my_as: u16::from_be_bytes([as0, as1]),
        hold_time: u16::from_be_bytes([hold0, hold1]),
        bgp_identifier: Ipv4Addr::new(id0, id1, id2, id3),
        capabilities: decode_parameters(params)?,
    })
}

/// Optional parameters: type (1), length (1), value; only Capabilities is accepted
/// (RFC 4271 §6.2: anything else is Unsupported Optional Parameter).
fn decode_parameters(params: &[u8]) -> Result<Vec<Capability>, DecodeError> {
    let mut r = Reader::new(params);
    let mut capabilities = Vec::new();
    while !r.is_empty() {
        let malformed = DecodeError::MalformedOptionalParameters { length: params.len(), available: params.len() };
        let (param_type, len) = (r.u8().ok_or(malformed.clone())?, r.u8().ok_or(malformed.clone())?);
        let value = r.take(usize::from(len)).ok_or(malformed)?;
        if param_type != PARAM_CAPABILITIES {
            return Err(DecodeError::UnsupportedOptionalParameter { parameter_type: param_type });
        }
        decode_capabilities(value, &mut capabilities)?;
    }
    Ok(capabilities)
}

/// Capabilities: code (1), length (1), value (RFC 5492 §4).
fn decode_capabilities(value: &[u8], into: &mut Vec<Capability>) -> Result<(), DecodeError> {
    let mut r = Reader::new(value);
    while !r.is_empty() {
        let code = r.u8().ok_or(DecodeError::MalformedCapability { code: 0, length: 0 })?;
        let len = usize::from(r.u8().ok_or(DecodeError::MalformedCapability { code, length: 0 })?);
        let malformed = DecodeError::MalformedCapability { code, length: len };
        let cap = r.take(len).ok_or(malformed.clone())?;
        into.push(match (code, cap) {
            (CAP_MULTIPROTOCOL, &[a0, a1, _reserved, safi]) => {
                Capability::Multiprotocol { afi: u16::from_be_bytes([a0, a1]), safi }
            }
            (CAP_FOUR_OCTET_AS, &[a0, a1, a2, a3]) => {
                Capability::FourOctetAs { asn: u32::from_be_bytes([a0, a1, a2, a3]) }
            }
            (CAP_MULTIPROTOCOL | CAP_FOUR_OCTET_AS, _) => return Err(malformed),
            _ => Capability::Unknown { code, value: cap.to_vec() },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{decode as decode_message, encode, Message, MARKER};
    use super::*;

    fn open_bytes(version: u8, params: &[u8]) -> Vec<u8> {
        let mut out = MARKER.to_vec();
        out.extend_from_slice(&((29 + params.len()) as u16).to_be_bytes());
        out.push(1);
        out.push(version);
        out.extend_from_slice(&[0xfd, 0xe9, 0, 9, 10, 0, 0, 1]); // AS 65001, hold 9, 10.0.0.1
        out.push(params.len() as u8);
        out.extend_from_slice(params);
        out
    }

    fn decode_open(bytes: &[u8]) -> Result<Open, DecodeError> {
        match decode_message(bytes)? {
            Some((Message::Open(open), used)) if used == bytes.len() => Ok(open),
            other => panic!("not one OPEN: {other:?}"),
        }
    }

    #[test]
    fn our_open_has_version_4_as_hold_time_identifier_and_both_capabilities() {
        let bytes = encode(&Message::Open(Open::new(65000, 9, Ipv4Addr::new(192, 0, 2, 1)))).unwrap();
        #[rustfmt::skip]
        let body = [
            4, 0xfd, 0xe8, 0, 9, 192, 0, 2, 1, // version, AS 65000, hold 9, identifier
            14, 2, 12,                         // one Capabilities parameter of 12 octets
            1, 4, 0, 1, 0, 1,                  // Multiprotocol IPv4 unicast
            65, 4, 0, 0, 0xfd, 0xe8,           // 4-octet AS 65000
        ];
        assert_eq!(&bytes[19..], &body);
        assert_eq!(bytes.len(), 19 + body.len());
    }

    #[test]
    fn a_local_as_above_65535_puts_as_trans_in_the_two_octet_field() {
        let open = Open::new(4_200_000_001, 9, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(open.my_as, AS_TRANS);
        assert_eq!(open.four_octet_as(), Some(4_200_000_001));
        assert_eq!(open.peer_as(), 4_200_000_001);
        let message = Message::Open(open);
        let bytes = encode(&message).unwrap();
        assert_eq!(&bytes[20..22], &AS_TRANS.to_be_bytes());
        assert_eq!(decode_message(&bytes).unwrap(), Some((message, bytes.len())));
    }

    #[test]
    fn an_open_without_capabilities_takes_the_as_from_the_two_octet_field() {
        let open = decode_open(&open_bytes(4, &[])).unwrap();
        assert_eq!(open.capabilities, vec![]);
        assert_eq!((open.peer_as(), open.hold_time, open.bgp_identifier), (65001, 9, Ipv4Addr::new(10, 0, 0, 1)));
        let message = Message::Open(open);
        assert_eq!(encode(&message).unwrap(), open_bytes(4, &[]));
    }

    #[test]
    fn unknown_capabilities_are_kept_with_code_and_value_across_several_parameters() {
        // Route refresh (2, empty), then in a second parameter an MP IPv6 unicast and a
        // graceful restart (64) with two value octets.
        let params = [2, 2, 2, 0, 2, 10, 1, 4, 0, 2, 0, 1, 64, 2, 0x00, 0x78];
        let open = decode_open(&open_bytes(4, &params)).unwrap();
        assert_eq!(
            open.capabilities,
            vec![
                Capability::Unknown { code: 2, value: vec![] },
                Capability::Multiprotocol { afi: 2, safi: 1 },
                Capability::Unknown { code: 64, value: vec![0x00, 0x78] },
            ]
        );
        let reencoded = encode(&Message::Open(open.clone())).unwrap();
        assert_eq!(decode_open(&reencoded).unwrap(), open);
    }

    #[test]
    fn version_3_is_unsupported_version_number_naming_version_4() {
        let err = decode_open(&open_bytes(3, &[])).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion { version: 3 });
        assert_eq!((err.notification().code, err.notification().subcode, err.notification().data), (2, 1, vec![0, 4]));
    }

    #[test]
    fn a_parameter_other_than_capabilities_is_unsupported_optional_parameter() {
        let err = decode_open(&open_bytes(4, &[1, 1, 0])).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedOptionalParameter { parameter_type: 1 });
        assert_eq!((err.notification().code, err.notification().subcode), (2, 4));
    }

    #[test]
    fn optional_parameters_length_must_match_the_body() {
        let mut bytes = open_bytes(4, &[2, 0]);
        bytes[28] = 3; // claims 3 octets, 2 follow
        assert_eq!(
            decode_open(&bytes).unwrap_err(),
            DecodeError::MalformedOptionalParameters { length: 3, available: 2 }
        );
        // A parameter whose own length runs past the parameters.
        assert!(matches!(
            decode_open(&open_bytes(4, &[2, 5, 65, 4])).unwrap_err(),
            DecodeError::MalformedOptionalParameters { .. }
        ));
    }

    #[test]
    fn a_known_capability_with_the_wrong_length_is_malformed() {
        let err = decode_open(&open_bytes(4, &[2, 4, 65, 2, 0, 1])).unwrap_err();
        assert_eq!(err, DecodeError::MalformedCapability { code: 65, length: 2 });
        assert_eq!((err.notification().code, err.notification().subcode), (2, 0));
        // A capability running past its parameter.
        let err = decode_open(&open_bytes(4, &[2, 3, 70, 5, 0])).unwrap_err();
        assert_eq!(err, DecodeError::MalformedCapability { code: 70, length: 5 });
    }

    #[test]
    fn capabilities_too_long_for_one_parameter_are_not_encoded() {
        let mut open = Open::new(65000, 9, Ipv4Addr::new(192, 0, 2, 1));
        open.capabilities.push(Capability::Unknown { code: 99, value: vec![0; 255] });
        assert!(matches!(encode(&Message::Open(open.clone())), Err(EncodeError::OptionalParametersTooLong { .. })));
        open.capabilities.push(Capability::Unknown { code: 98, value: vec![0; 256] });
        assert_eq!(encode(&Message::Open(open)).unwrap_err(), EncodeError::CapabilityTooLong { code: 98, length: 256 });
    }
}

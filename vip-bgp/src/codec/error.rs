//! Codec errors. Each decode error carries what RFC 4271 §6 needs to build the
//! NOTIFICATION the receiving speaker sends before it closes the connection.

use super::notification::{self as n, Notification};
use super::BGP_VERSION;

/// A received message that breaks RFC 4271 §4 framing; the connection must be closed
/// after sending [`DecodeError::notification`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header's 16-octet marker is not all ones (RFC 4271 §6.1).
    #[error("message header marker is not all ones")]
    BadMarker,
    /// The header's length is below 19, above 4096, or outside the bounds of the
    /// message's type (RFC 4271 §6.1).
    #[error("bad message length {length}")]
    BadLength { length: u16 },
    /// The header's type is not OPEN, UPDATE, NOTIFICATION or KEEPALIVE (RFC 4271 §6.1).
    #[error("bad message type {message_type}")]
    BadType { message_type: u8 },
    /// The OPEN bids a version other than 4 (RFC 4271 §6.2).
    #[error("unsupported BGP version {version}")]
    UnsupportedVersion { version: u8 },
    /// The OPEN's optional parameters do not fill its body exactly, or one of them runs
    /// past the end (RFC 4271 §4.2, §6.2 with no specific subcode).
    #[error("OPEN optional parameters length {length} does not match the {available} octets that follow")]
    MalformedOptionalParameters { length: usize, available: usize },
    /// An optional parameter other than Capabilities (type 2, RFC 5492), including the
    /// RFC 9072 extended-length form (type 255), which we do not support.
    #[error("unsupported OPEN optional parameter type {parameter_type}")]
    UnsupportedOptionalParameter { parameter_type: u8 },
    /// A capability we understand has the wrong length, or a capability runs past the end
    /// of its optional parameter (RFC 5492 §3).
    #[error("malformed capability {code} ({length} octets)")]
    MalformedCapability { code: u8, length: usize },
    /// The UPDATE's Withdrawn Routes Length and Total Path Attribute Length do not fit in
    /// the message, or a path attribute's length runs past the attributes (RFC 4271 §6.3).
    #[error("malformed UPDATE attribute list: {detail}")]
    MalformedAttributeList { detail: &'static str },
    /// An IPv4 prefix in Withdrawn Routes or NLRI has a length over 32 or runs past the
    /// end of its field (RFC 4271 §6.3).
    #[error("invalid network field: {detail}")]
    InvalidNetworkField { detail: &'static str },
}

impl DecodeError {
    /// The NOTIFICATION to send for this error (RFC 4271 §6.1–§6.3): code, subcode and the
    /// data the RFC asks for (the bad length, the bad type, our version).
    pub fn notification(&self) -> Notification {
        match *self {
            Self::BadMarker => Notification::new(n::MESSAGE_HEADER_ERROR, n::CONNECTION_NOT_SYNCHRONIZED, Vec::new()),
            Self::BadLength { length } => {
                Notification::new(n::MESSAGE_HEADER_ERROR, n::BAD_MESSAGE_LENGTH, length.to_be_bytes().to_vec())
            }
            Self::BadType { message_type } => {
                Notification::new(n::MESSAGE_HEADER_ERROR, n::BAD_MESSAGE_TYPE, vec![message_type])
            }
            // The data is the largest version we support, as a 2-octet integer.
            Self::UnsupportedVersion { .. } => Notification::new(
                n::OPEN_MESSAGE_ERROR,
                n::UNSUPPORTED_VERSION_NUMBER,
                u16::from(BGP_VERSION).to_be_bytes().to_vec(),
            ),
            Self::MalformedOptionalParameters { .. } | Self::MalformedCapability { .. } => {
                Notification::new(n::OPEN_MESSAGE_ERROR, n::UNSPECIFIC, Vec::new())
            }
            Self::UnsupportedOptionalParameter { .. } => {
                Notification::new(n::OPEN_MESSAGE_ERROR, n::UNSUPPORTED_OPTIONAL_PARAMETER, Vec::new())
            }
            Self::MalformedAttributeList { .. } => {
                Notification::new(n::UPDATE_MESSAGE_ERROR, n::MALFORMED_ATTRIBUTE_LIST, Vec::new())
            }
            Self::InvalidNetworkField { .. } => {
                Notification::new(n::UPDATE_MESSAGE_ERROR, n::INVALID_NETWORK_FIELD, Vec::new())
            }
        }
    }
}

/// A message that cannot be put on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Longer than the 4096 octets RFC 4271 §4.1 allows.
    #[error("message of {length} octets exceeds 4096")]
    MessageTooLong { length: usize },
    /// A capability value longer than its 1-octet length field (RFC 5492 §4).
    #[error("capability {code} value of {length} octets exceeds 255")]
    CapabilityTooLong { code: u8, length: usize },
    /// The capabilities do not fit in the OPEN's 1-octet Optional Parameters Length.
    #[error("OPEN optional parameters of {length} octets exceed 255")]
    OptionalParametersTooLong { length: usize },
    /// A path attribute value longer than its length field (1 octet, or 2 with the
    /// Extended Length flag; RFC 4271 §4.3).
    #[error("path attribute {type_code} value of {length} octets does not fit its length field")]
    AttributeTooLong { type_code: u8, length: usize },
}

//! NOTIFICATION (RFC 4271 §4.5): error code, error subcode, data. Sent just before a
//! speaker closes the connection; the codes below are the ones this crate sends or names
//! in its logs (RFC 4271 §6, RFC 6608 for the FSM subcodes, RFC 4486 for Cease).

use std::fmt;

/// Octets in a NOTIFICATION with no data: header (19), code (1), subcode (1).
pub(super) const MIN_LEN: usize = super::HEADER_LEN + 2;

/// Error codes (RFC 4271 §4.5).
pub const MESSAGE_HEADER_ERROR: u8 = 1;
pub const OPEN_MESSAGE_ERROR: u8 = 2;
pub const UPDATE_MESSAGE_ERROR: u8 = 3;
pub const HOLD_TIMER_EXPIRED: u8 = 4;
pub const FSM_ERROR: u8 = 5;
pub const CEASE: u8 = 6;

/// "No more specific subcode" for any error code (RFC 4271 §4.5).
pub const UNSPECIFIC: u8 = 0;
/// Message Header Error subcodes (RFC 4271 §6.1).
pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
pub const BAD_MESSAGE_LENGTH: u8 = 2;
pub const BAD_MESSAGE_TYPE: u8 = 3;
/// OPEN Message Error subcodes (RFC 4271 §6.2).
pub const UNSUPPORTED_VERSION_NUMBER: u8 = 1;
pub const BAD_PEER_AS: u8 = 2;
pub const BAD_BGP_IDENTIFIER: u8 = 3;
pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
/// UPDATE Message Error subcodes (RFC 4271 §6.3).
pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
pub const INVALID_NETWORK_FIELD: u8 = 10;
/// FSM Error subcodes (RFC 6608 §4): which state an unexpected message arrived in.
pub const UNEXPECTED_MESSAGE_IN_OPEN_SENT: u8 = 1;
pub const UNEXPECTED_MESSAGE_IN_OPEN_CONFIRM: u8 = 2;
pub const UNEXPECTED_MESSAGE_IN_ESTABLISHED: u8 = 3;
/// Cease subcodes (RFC 4486 §4).
pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;

/// A NOTIFICATION message's body. `data` is opaque except for the cases RFC 4271 §6
/// defines (a bad length, a bad type, a version) and the RFC 8203 shutdown communication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Self {
        Self { code, subcode, data }
    }

    /// Cease / Administrative Shutdown (6/2, RFC 4486) carrying a shutdown communication
    /// (RFC 8203, as updated by RFC 9003: a length octet then UTF-8 text), or no data when
    /// the communication is empty.
    pub fn administrative_shutdown(communication: &ShutdownCommunication) -> Self {
        let text = communication.as_str().as_bytes();
        let data = if text.is_empty() {
            Vec::new()
        } else {
            // ShutdownCommunication caps the text at 255 octets, so the length fits.
            let mut data = vec![text.len() as u8];
            data.extend_from_slice(text);
            data
        };
        Self::new(CEASE, ADMINISTRATIVE_SHUTDOWN, data)
    }

    /// The shutdown communication of a received Cease (RFC 9003 §2: subcodes 2 and 4),
    /// if it has a well-formed one.
    pub fn shutdown_communication(&self) -> Option<&str> {
        if self.code != CEASE || !matches!(self.subcode, 2 | 4) {
            return None;
        }
        let (&len, text) = self.data.split_first()?;
        std::str::from_utf8(text.get(..usize::from(len))?).ok()
    }

    /// A short English name of the code and subcode, for logs and status.
    pub fn describe(&self) -> &'static str {
        match (self.code, self.subcode) {
            (1, 1) => "Message Header Error, Connection Not Synchronized",
            (1, 2) => "Message Header Error, Bad Message Length",
            (1, 3) => "Message Header Error, Bad Message Type",
            (1, _) => "Message Header Error",
            (2, 1) => "OPEN Message Error, Unsupported Version Number",
            (2, 2) => "OPEN Message Error, Bad Peer AS",
            (2, 3) => "OPEN Message Error, Bad BGP Identifier",
            (2, 4) => "OPEN Message Error, Unsupported Optional Parameter",
            (2, 6) => "OPEN Message Error, Unacceptable Hold Time",
            (2, 7) => "OPEN Message Error, Unsupported Capability",
            (2, _) => "OPEN Message Error",
            (3, 1) => "UPDATE Message Error, Malformed Attribute List",
            (3, 10) => "UPDATE Message Error, Invalid Network Field",
            (3, _) => "UPDATE Message Error",
            (4, _) => "Hold Timer Expired",
            (5, _) => "Finite State Machine Error",
            (6, 1) => "Cease, Maximum Number of Prefixes Reached",
            (6, 2) => "Cease, Administrative Shutdown",
            (6, 3) => "Cease, Peer De-configured",
            (6, 4) => "Cease, Administrative Reset",
            (6, 5) => "Cease, Connection Rejected",
            (6, 6) => "Cease, Other Configuration Change",
            (6, 7) => "Cease, Connection Collision Resolution",
            (6, 8) => "Cease, Out of Resources",
            (6, 9) => "Cease, Hard Reset",
            (6, _) => "Cease",
            _ => "unknown error code",
        }
    }

    pub(super) fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.code);
        out.push(self.subcode);
        out.extend_from_slice(&self.data);
    }
}

/// `code/subcode (name)`, e.g. `6/2 (Cease, Administrative Shutdown)`.
impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.code, self.subcode, self.describe())?;
        if let Some(text) = self.shutdown_communication() {
            write!(f, " \"{}\"", text.escape_debug())?;
        }
        Ok(())
    }
}

/// Decodes a NOTIFICATION body (everything after the header). The header check already
/// ensured at least code and subcode are present; anything after them is data.
pub(super) fn decode(body: &[u8]) -> Notification {
    match body {
        [code, subcode, data @ ..] => Notification::new(*code, *subcode, data.to_vec()),
        // Unreachable after the header's length check; an empty NOTIFICATION is
        // represented rather than trusted to that check.
        [code] => Notification::new(*code, 0, Vec::new()),
        [] => Notification::new(0, 0, Vec::new()),
    }
}

/// An RFC 8203/9003 shutdown communication: UTF-8 text of at most 255 octets, cut at a
/// character boundary if longer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownCommunication(String);

impl ShutdownCommunication {
    /// RFC 9003 §2: the length field is one octet.
    pub const MAX_LEN: usize = 255;

    pub fn new(text: &str) -> Self {
        let mut end = text.len().min(Self::MAX_LEN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self(text[..end].to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode as decode_message, encode, Message};
    use super::*;

    fn roundtrip(notification: Notification) {
        let message = Message::Notification(notification);
        let bytes = encode(&message).unwrap();
        assert_eq!(decode_message(&bytes).unwrap(), Some((message, bytes.len())));
    }

    #[test]
    fn a_notification_encodes_code_subcode_and_data_and_decodes_back() {
        let bytes = encode(&Message::Notification(Notification::new(2, 6, vec![0, 2]))).unwrap();
        assert_eq!(&bytes[16..], &[0, 23, 3, 2, 6, 0, 2]);
        roundtrip(Notification::new(2, 6, vec![0, 2]));
        roundtrip(Notification::new(4, 0, vec![]));
    }

    #[test]
    fn administrative_shutdown_carries_the_communication_with_its_length() {
        let notification = Notification::administrative_shutdown(&ShutdownCommunication::new("node drained"));
        assert_eq!((notification.code, notification.subcode), (6, 2));
        assert_eq!(notification.data[0], 12);
        assert_eq!(&notification.data[1..], b"node drained");
        assert_eq!(notification.shutdown_communication(), Some("node drained"));
        assert_eq!(notification.to_string(), "6/2 (Cease, Administrative Shutdown) \"node drained\"");
        roundtrip(notification);
    }

    #[test]
    fn an_empty_shutdown_communication_sends_no_data() {
        let notification = Notification::administrative_shutdown(&ShutdownCommunication::default());
        assert_eq!(notification, Notification::new(6, 2, vec![]));
    }

    #[test]
    fn a_long_shutdown_communication_is_cut_at_255_octets_on_a_character_boundary() {
        let text = "é".repeat(200); // 400 octets
        let communication = ShutdownCommunication::new(&text);
        assert_eq!(communication.as_str().len(), 254);
        let notification = Notification::administrative_shutdown(&communication);
        assert_eq!(notification.data.len(), 255);
    }

    #[test]
    fn a_communication_whose_length_overruns_the_data_is_not_read() {
        let notification = Notification::new(6, 2, vec![10, b'a']);
        assert_eq!(notification.shutdown_communication(), None);
        assert_eq!(notification.to_string(), "6/2 (Cease, Administrative Shutdown)");
    }
}

//! BGP-4 wire codec (RFC 4271 §4), limited to what an announce-only speaker needs.
//!
//! Every message starts with the 19-octet header: a 16-octet marker of all ones, a 2-octet
//! length (network byte order, the whole message including the header, 19..=4096) and a
//! 1-octet type. [`decode`] takes a byte stream and yields whole messages; it never panics,
//! whatever the input, and each [`DecodeError`] names the NOTIFICATION the speaker must
//! send in return (RFC 4271 §6). [`encode`] is its inverse: whatever [`decode`] returns,
//! [`encode`] turns back into bytes that decode to the same [`Message`].
//!
//! Decoded UPDATEs are framed strictly (section lengths, prefix and path-attribute framing)
//! but their attributes are kept as opaque type/value pairs: an announce-only speaker
//! checks and then discards what the router sends.

mod error;
pub mod notification;
pub mod open;
pub mod update;

pub use error::{DecodeError, EncodeError};
pub use notification::{Notification, ShutdownCommunication};
pub use open::{Capability, Open};
pub use update::{AsPathEncoding, PathAttribute, Update};

/// The header's marker: 16 octets of all ones (RFC 4271 §4.1; authentication, its old use,
/// moved to TCP-MD5).
pub const MARKER: [u8; 16] = [0xff; 16];
/// Octets in the header: marker (16), length (2), type (1). Also the length of a KEEPALIVE,
/// which is a header alone (RFC 4271 §4.4).
pub const HEADER_LEN: usize = 19;
/// The largest message RFC 4271 §4.1 allows. RFC 8654 raises it to 65535 only when both
/// sides advertise the Extended Message capability, which we never do.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// The protocol version we speak and accept in an OPEN (RFC 4271 §4.2).
pub const BGP_VERSION: u8 = 4;
/// The 2-octet AS a 4-octet-AS speaker puts where only two octets fit (RFC 6793 §9).
pub const AS_TRANS: u16 = 23456;

/// The message types we understand (RFC 4271 §4.1). ROUTE-REFRESH (type 5, RFC 2918) is
/// not among them: a peer may only send it after we advertised the capability, which we
/// never do, so it is refused as a bad type like any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Open = 1,
    Update = 2,
    Notification = 3,
    Keepalive = 4,
}

impl MessageType {
    fn from_wire(octet: u8) -> Option<Self> {
        match octet {
            1 => Some(Self::Open),
            2 => Some(Self::Update),
            3 => Some(Self::Notification),
            4 => Some(Self::Keepalive),
            _ => None,
        }
    }

    /// The smallest valid length of a message of this type, header included (RFC 4271 §4).
    fn min_len(self) -> usize {
        match self {
            Self::Open => open::MIN_LEN,
            Self::Update => update::MIN_LEN,
            Self::Notification => notification::MIN_LEN,
            Self::Keepalive => HEADER_LEN,
        }
    }
}

/// One BGP message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Open(_) => MessageType::Open,
            Self::Update(_) => MessageType::Update,
            Self::Notification(_) => MessageType::Notification,
            Self::Keepalive => MessageType::Keepalive,
        }
    }
}

/// Decodes the first message in `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than a whole message (read more and call
/// again), and `Ok(Some((message, consumed)))` once it does, `consumed` being the message's
/// length in octets. Errors are final for the connection: send
/// [`DecodeError::notification`] and close.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let (msg_type, len) = decode_header(header)?;
    let Some(msg) = buf.get(..len) else { return Ok(None) };
    let body = &msg[HEADER_LEN..];
    let message = match msg_type {
        MessageType::Open => Message::Open(open::decode(body)?),
        MessageType::Update => Message::Update(update::decode(body)?),
        MessageType::Notification => Message::Notification(notification::decode(body)),
        MessageType::Keepalive => Message::Keepalive,
    };
    Ok(Some((message, len)))
}

/// Checks a header (RFC 4271 §6.1): marker, then type, then the length against the type's
/// bounds. Returns the type and the whole message's length.
fn decode_header(header: &[u8]) -> Result<(MessageType, usize), DecodeError> {
    if header[..16] != MARKER {
        return Err(DecodeError::BadMarker);
    }
    let len = u16::from_be_bytes([header[16], header[17]]);
    let msg_type = MessageType::from_wire(header[18]).ok_or(DecodeError::BadType { message_type: header[18] })?;
    let ulen = usize::from(len);
    let fits = match msg_type {
        // A KEEPALIVE is the header alone, exactly (RFC 4271 §4.4).
        MessageType::Keepalive => ulen == HEADER_LEN,
        _ => (msg_type.min_len()..=MAX_MESSAGE_LEN).contains(&ulen),
    };
    if !fits {
        return Err(DecodeError::BadLength { length: len });
    }
    Ok((msg_type, ulen))
}

/// Encodes one message, header included, in network byte order.
///
/// Fails only when a field cannot be represented (a capability longer than 255 octets,
/// a message longer than [`MAX_MESSAGE_LEN`]); the constructors of this module
/// ([`Open::new`], [`Update::announce`], [`Update::withdraw`], [`Notification`]'s) never
/// build such messages.
pub fn encode(message: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&[0, 0]); // length, filled in below
    out.push(message.message_type() as u8);
    match message {
        Message::Open(open) => open.encode_body(&mut out)?,
        Message::Update(update) => update.encode_body(&mut out)?,
        Message::Notification(notification) => notification.encode_body(&mut out),
        Message::Keepalive => {}
    }
    let len = u16::try_from(out.len())
        .ok()
        .filter(|&len| usize::from(len) <= MAX_MESSAGE_LEN)
        .ok_or(EncodeError::MessageTooLong { length: out.len() })?;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// A cursor over a message body that never reads past its end: every read is checked and
/// a short body becomes the caller's error.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u16, msg_type: u8) -> Vec<u8> {
        let mut out = MARKER.to_vec();
        out.extend_from_slice(&len.to_be_bytes());
        out.push(msg_type);
        out
    }

    #[test]
    fn a_keepalive_is_the_nineteen_octet_header_alone() {
        let bytes = encode(&Message::Keepalive).unwrap();
        assert_eq!(bytes, header(19, 4));
        assert_eq!(decode(&bytes).unwrap(), Some((Message::Keepalive, 19)));
    }

    #[test]
    fn a_partial_message_asks_for_more_bytes() {
        let bytes = encode(&Message::Keepalive).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
        let notification = encode(&Message::Notification(Notification::new(6, 2, vec![1, 2, 3]))).unwrap();
        assert_eq!(decode(&notification[..notification.len() - 1]).unwrap(), None);
    }

    #[test]
    fn decode_consumes_one_message_and_leaves_the_next() {
        let mut stream = encode(&Message::Keepalive).unwrap();
        let notification = Message::Notification(Notification::new(4, 0, vec![]));
        stream.extend(encode(&notification).unwrap());
        let (first, used) = decode(&stream).unwrap().unwrap();
        assert_eq!((first, used), (Message::Keepalive, 19));
        assert_eq!(decode(&stream[used..]).unwrap(), Some((notification, 21)));
    }

    #[test]
    fn a_bad_marker_is_connection_not_synchronized() {
        let mut bytes = header(19, 4);
        bytes[3] = 0xfe;
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err, DecodeError::BadMarker);
        assert_eq!(err.notification(), Notification::new(1, 1, vec![]));
    }

    #[test]
    fn a_length_below_nineteen_is_bad_message_length_with_the_length() {
        for len in [0u16, 1, 18] {
            let err = decode(&header(len, 4)).unwrap_err();
            assert_eq!(err, DecodeError::BadLength { length: len });
            assert_eq!(err.notification(), Notification::new(1, 2, len.to_be_bytes().to_vec()));
        }
    }

    #[test]
    fn a_length_above_4096_is_bad_message_length() {
        let err = decode(&header(4097, 2)).unwrap_err();
        assert_eq!(err.notification(), Notification::new(1, 2, vec![0x10, 0x01]));
    }

    #[test]
    fn a_keepalive_longer_than_the_header_is_bad_message_length() {
        let mut bytes = header(20, 4);
        bytes.push(0);
        assert_eq!(decode(&bytes).unwrap_err(), DecodeError::BadLength { length: 20 });
    }

    #[test]
    fn each_type_shorter_than_its_minimum_is_bad_message_length() {
        for (msg_type, min) in [(1u8, 29u16), (2, 23), (3, 21)] {
            let mut bytes = header(min - 1, msg_type);
            bytes.resize(usize::from(min - 1), 0);
            assert_eq!(decode(&bytes).unwrap_err(), DecodeError::BadLength { length: min - 1 }, "type {msg_type}");
        }
    }

    #[test]
    fn an_unknown_type_is_bad_message_type_with_the_type() {
        for msg_type in [0u8, 5, 255] {
            let err = decode(&header(19, msg_type)).unwrap_err();
            assert_eq!(err, DecodeError::BadType { message_type: msg_type });
            assert_eq!(err.notification(), Notification::new(1, 3, vec![msg_type]));
        }
    }

    #[test]
    fn a_message_over_4096_octets_is_not_encoded() {
        let notification = Notification::new(6, 0, vec![0; MAX_MESSAGE_LEN]);
        let err = encode(&Message::Notification(notification)).unwrap_err();
        assert_eq!(err, EncodeError::MessageTooLong { length: 21 + MAX_MESSAGE_LEN });
    }
}

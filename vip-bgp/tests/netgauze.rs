//! Cross-check of the codec against an independent implementation, netgauze-bgp-pkt:
//! what we encode, netgauze decodes to the fields we meant; what netgauze encodes, we
//! decode to the same message our constructors build.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netgauze_bgp_pkt::{
    capabilities::{BgpCapability, FourOctetAsCapability, MultiProtocolExtensionsCapability},
    nlri::{Ipv4Unicast, Ipv4UnicastAddress},
    notification::{BgpNotificationMessage, CeaseError, HoldTimerExpiredError, OpenMessageError},
    open::{BgpOpenMessage, BgpOpenMessageParameter},
    path_attribute::{
        As2PathSegment, As4Path, As4PathSegment, AsPath, AsPathSegmentType, NextHop, Origin, PathAttribute,
        PathAttributeValue,
    },
    update::BgpUpdateMessage,
    wire::deserializer::BgpParsingContext,
    BgpMessage,
};
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::{reader::SliceReader, traits::ParseFromWithOneInput, WritablePdu};
use vip_bgp::codec::{
    self, AsPathEncoding, Capability, Message, Notification, Open, ShutdownCommunication, Update, AS_TRANS,
};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

fn vip() -> Ipv4Net {
    "192.0.2.10/32".parse().unwrap()
}

/// Our bytes through netgauze's parser; the whole input must be consumed.
fn netgauze_decode(bytes: &[u8], asn4: bool) -> BgpMessage {
    let mut context = if asn4 { BgpParsingContext::default() } else { BgpParsingContext::asn2_default() };
    let mut reader = SliceReader::new(bytes);
    let message = BgpMessage::parse(&mut reader, &mut context).expect("netgauze decodes our bytes");
    assert_eq!(reader.remaining(), 0, "netgauze left bytes unread");
    message
}

fn ours_through_netgauze(message: &Message, asn4: bool) -> BgpMessage {
    netgauze_decode(&codec::encode(message).unwrap(), asn4)
}

/// netgauze's bytes through our decoder; the whole input must be one message.
fn netgauze_through_ours(message: &BgpMessage) -> Message {
    let mut bytes = Vec::new();
    message.write(&mut bytes).expect("netgauze encodes");
    let (decoded, used) = codec::decode(&bytes).expect("we decode netgauze's bytes").expect("a whole message");
    assert_eq!(used, bytes.len());
    decoded
}

fn well_known(value: PathAttributeValue) -> PathAttribute {
    PathAttribute::from(false, true, false, false, value).unwrap()
}

fn ipv4_unicast(net: Ipv4Net) -> Ipv4UnicastAddress {
    Ipv4UnicastAddress::new_no_path_id(Ipv4Unicast::from_net(net).unwrap())
}

fn as4_sequence(asn: u32) -> As4PathSegment {
    As4PathSegment::new(AsPathSegmentType::AsSequence, [asn])
}

#[test]
fn our_open_reads_in_netgauze_with_version_as_hold_time_identifier_and_capabilities() {
    let BgpMessage::Open(open) = ours_through_netgauze(&Message::Open(Open::new(65000, 9, NODE)), true) else {
        panic!("not an OPEN")
    };
    assert_eq!((open.version(), open.my_as(), open.hold_time(), open.bgp_id()), (4, 65000, 9, NODE));
    assert_eq!(
        open.capabilities(),
        vec![
            &BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(AddressType::Ipv4Unicast)),
            &BgpCapability::FourOctetAs(FourOctetAsCapability::new(65000)),
        ]
    );
}

#[test]
fn our_open_with_a_four_octet_as_reads_in_netgauze_as_as_trans_plus_the_capability() {
    let message = Message::Open(Open::new(4_200_000_001, 9, NODE));
    let BgpMessage::Open(open) = ours_through_netgauze(&message, true) else { panic!("not an OPEN") };
    assert_eq!(open.my_as(), AS_TRANS);
    assert!(open.capabilities().contains(&&BgpCapability::FourOctetAs(FourOctetAsCapability::new(4_200_000_001))));
}

#[test]
fn a_netgauze_open_decodes_in_ours_with_unknown_capabilities_kept() {
    let capabilities = [
        BgpCapability::MultiProtocolExtensions(MultiProtocolExtensionsCapability::new(AddressType::Ipv4Unicast)),
        BgpCapability::RouteRefresh,
        BgpCapability::FourOctetAs(FourOctetAsCapability::new(65001)),
    ];
    let theirs = BgpOpenMessage::new(65001, 3, ROUTER, [BgpOpenMessageParameter::new_capabilities(capabilities)]);
    let Message::Open(open) = netgauze_through_ours(&BgpMessage::Open(theirs)) else { panic!("not an OPEN") };
    assert_eq!((open.my_as, open.hold_time, open.bgp_identifier), (65001, 3, ROUTER));
    assert_eq!(
        open.capabilities,
        vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::Unknown { code: 2, value: vec![] },
            Capability::FourOctetAs { asn: 65001 },
        ]
    );
    assert_eq!(open.peer_as(), 65001);
}

#[test]
fn keepalives_agree_both_ways() {
    assert_eq!(ours_through_netgauze(&Message::Keepalive, true), BgpMessage::KeepAlive);
    assert_eq!(netgauze_through_ours(&BgpMessage::KeepAlive), Message::Keepalive);
}

#[test]
fn our_announcement_reads_in_netgauze_as_origin_igp_our_as_path_and_next_hop() {
    let update = Update::announce(&[vip()], 65000, NODE, AsPathEncoding::FourOctet).remove(0);
    let BgpMessage::Update(theirs) = ours_through_netgauze(&Message::Update(update), true) else {
        panic!("not an UPDATE")
    };
    let expected = BgpUpdateMessage::new(
        vec![],
        vec![
            well_known(PathAttributeValue::Origin(Origin::IGP)),
            well_known(PathAttributeValue::AsPath(AsPath::as4_path_segments([as4_sequence(65000)]))),
            well_known(PathAttributeValue::NextHop(NextHop::new(NODE))),
        ],
        vec![ipv4_unicast(vip())],
    );
    assert_eq!(theirs, expected);
}

#[test]
fn our_announcement_to_a_two_octet_peer_reads_in_netgauze_with_as_trans_and_as4_path() {
    let update = Update::announce(&[vip()], 4_200_000_001, NODE, AsPathEncoding::TwoOctet).remove(0);
    let BgpMessage::Update(theirs) = ours_through_netgauze(&Message::Update(update), false) else {
        panic!("not an UPDATE")
    };
    let values: Vec<&PathAttributeValue> = theirs.path_attributes().iter().map(PathAttribute::value).collect();
    assert_eq!(
        values,
        vec![
            &PathAttributeValue::Origin(Origin::IGP),
            &PathAttributeValue::AsPath(AsPath::as2_path_segments([As2PathSegment::new(
                AsPathSegmentType::AsSequence,
                [AS_TRANS]
            )])),
            &PathAttributeValue::NextHop(NextHop::new(NODE)),
            &PathAttributeValue::As4Path(As4Path::new([as4_sequence(4_200_000_001)])),
        ]
    );
    assert!(theirs.path_attributes()[3].optional() && theirs.path_attributes()[3].transitive());
}

#[test]
fn a_netgauze_announcement_decodes_in_ours_as_our_own_announcement() {
    let theirs = BgpUpdateMessage::new(
        vec![],
        vec![
            well_known(PathAttributeValue::Origin(Origin::IGP)),
            well_known(PathAttributeValue::AsPath(AsPath::as4_path_segments([as4_sequence(65000)]))),
            well_known(PathAttributeValue::NextHop(NextHop::new(NODE))),
        ],
        vec![ipv4_unicast(vip())],
    );
    let expected = Update::announce(&[vip()], 65000, NODE, AsPathEncoding::FourOctet).remove(0);
    assert_eq!(netgauze_through_ours(&BgpMessage::Update(theirs)), Message::Update(expected));
}

#[test]
fn withdrawals_agree_both_ways() {
    let prefixes = [vip(), "10.0.0.0/8".parse().unwrap()];
    let ours = Update::withdraw(&prefixes).remove(0);
    let theirs = BgpUpdateMessage::new(prefixes.map(ipv4_unicast).to_vec(), vec![], vec![]);
    assert_eq!(ours_through_netgauze(&Message::Update(ours.clone()), true), BgpMessage::Update(theirs.clone()));
    assert_eq!(netgauze_through_ours(&BgpMessage::Update(theirs)), Message::Update(ours));
}

#[test]
fn our_cease_with_a_shutdown_communication_reads_in_netgauze_as_administrative_shutdown() {
    let cease = Notification::administrative_shutdown(&ShutdownCommunication::new("node drained"));
    let BgpMessage::Notification(theirs) = ours_through_netgauze(&Message::Notification(cease.clone()), true) else {
        panic!("not a NOTIFICATION")
    };
    assert_eq!(
        theirs,
        BgpNotificationMessage::CeaseError(CeaseError::AdministrativeShutdown { value: cease.data.clone().into() })
    );
    assert_eq!(netgauze_through_ours(&BgpMessage::Notification(theirs)), Message::Notification(cease));
}

#[test]
fn open_errors_and_hold_timer_expired_agree_both_ways() {
    let cases = [
        (
            Notification::new(2, 6, vec![]),
            BgpNotificationMessage::OpenMessageError(OpenMessageError::UnacceptableHoldTime { value: [].into() }),
        ),
        (
            Notification::new(2, 2, vec![]),
            BgpNotificationMessage::OpenMessageError(OpenMessageError::BadPeerAs { value: [].into() }),
        ),
        (
            Notification::new(4, 0, vec![]),
            BgpNotificationMessage::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific {
                sub_code: 0,
                value: [].into(),
            }),
        ),
    ];
    for (ours, theirs) in cases {
        assert_eq!(
            ours_through_netgauze(&Message::Notification(ours.clone()), true),
            BgpMessage::Notification(theirs.clone())
        );
        assert_eq!(netgauze_through_ours(&BgpMessage::Notification(theirs)), Message::Notification(ours));
    }
}

//! The wire: length-prefixed frames with compact CBOR bodies.
//!
//! The format is documented in the crate's documentation (*The wire format*), so that it
//! stays readable without the `testing` feature that makes this module public.

use crate::cbor::{head_len, put_head, read_head, ARRAY, BYTES, TEXT, UINT};

use crate::error::ProtocolError;
use crate::event::Fate;
use crate::id::{Destination, MessageId, NodeId, Timestamp};

/// The magic number that opens every hello: `"FKBS"`.
pub const MAGIC: u32 = 0x464b_4253;
/// The version of the wire format this crate speaks.
pub const WIRE_VERSION: u32 = 2;
/// Bytes before a frame's body: the length prefix and the kind.
pub const FRAME_HEADER_LEN: usize = 5;

const KIND_HELLO: u8 = 1;
const KIND_ENVELOPE: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_ROUTES: u8 = 4;
const KIND_CONTROL: u8 = 5;
const KIND_NOTICE: u8 = 6;

/// Per-envelope flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The origin wants a delivery receipt.
    pub const RECEIPT: Self = Self(1);
    /// Every hop appends itself to the envelope's trace.
    pub const TRACE: Self = Self(2);
    /// Handed over by a name's custodian to the name's new holder, its child: taken as is
    /// (origin, id and flags kept), accepted only from the receiver's parent.
    pub const HANDED: Self = Self(4);
    const ALL: u8 = 0b111;

    /// No flag set.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Whether every flag of `other` is set here.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Flags from raw bits; `None` when an unknown bit is set.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::ALL == 0 {
            Some(Self(bits))
        } else {
            None
        }
    }
}

/// One hop of a routing trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The node the envelope reached.
    pub node: NodeId,
    /// The index of the link it came in on at that node (`None` at the origin).
    pub link: Option<u32>,
    /// When it got there, on the node's clock.
    pub at: Timestamp,
}

/// A routed message: header, optional trace, and payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Origin and per-origin sequence number.
    pub id: MessageId,
    /// Where it goes.
    pub destination: Destination,
    /// Links traversed so far.
    pub hops: u8,
    /// Links it may traverse at most.
    pub hop_limit: u8,
    /// Receipt, trace and system flags.
    pub flags: Flags,
    /// The hops so far, when [`Flags::TRACE`] is set (the origin first).
    pub trace: Vec<Hop>,
    /// The application's bytes.
    pub payload: Vec<u8>,
}

/// What the hello says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's wire version.
    pub version: u32,
    /// The sender.
    pub node: NodeId,
}

/// One node as announced in a route update: it exists behind the link the update came on,
/// with these names and groups (replacing what was known of it).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// The node.
    pub node: NodeId,
    /// The node's announcement counter: an announcement older than the one known is stale
    /// (0: a bare neighbour, names not yet known).
    pub version: u64,
    /// The names it registered.
    pub names: Vec<String>,
    /// The groups it joined.
    pub groups: Vec<String>,
}

/// A change to one known node's names and groups: what a registration or a leave
/// announces, instead of the node's whole lists.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeDelta {
    /// The node.
    pub node: NodeId,
    /// Its announcement counter after this change (applied only when newer).
    pub version: u64,
    /// Names it registered.
    pub add_names: Vec<String>,
    /// Names it gave up.
    pub remove_names: Vec<String>,
    /// Groups it joined.
    pub join_groups: Vec<String>,
    /// Groups it left.
    pub leave_groups: Vec<String>,
}

impl NodeDelta {
    /// Whether the delta changes nothing.
    pub fn is_empty(&self) -> bool {
        self.add_names.is_empty()
            && self.remove_names.is_empty()
            && self.join_groups.is_empty()
            && self.leave_groups.is_empty()
    }
}

/// Nodes that joined, changed or left, behind the link the update came on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteUpdate {
    /// Nodes reachable through the sender, with all their names and groups.
    pub upsert: Vec<NodeInfo>,
    /// Nodes no longer reachable through the sender.
    pub remove: Vec<NodeId>,
    /// Changes to nodes known already.
    pub change: Vec<NodeDelta>,
}

impl RouteUpdate {
    /// Whether the update says nothing.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty() && self.change.is_empty()
    }
}

/// What a notice says about an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// The destination took it (a delivery receipt).
    Delivered,
    /// It was lost, or its fate is unknown, at the notice's sender.
    Lost {
        /// What is known of its fate.
        fate: Fate,
        /// Whether it was sent with a receipt (its origin then has it pending, or resolved
        /// it already: no second report).
        receipt: bool,
    },
    /// A name's custodian handed it over to this node, the name's new holder: the receipt
    /// now waits on it.
    Moved(NodeId),
}

/// A router-to-router notice about an envelope, routed hop by hop to the envelope's origin.
/// Numbered and acknowledged on each link like envelopes, but outside their queue bound:
/// never dropped while the links to the origin stand (each answers an envelope that
/// crossed the same links, so acknowledgements pace them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The envelope's origin: where the notice goes.
    pub origin: NodeId,
    /// The envelope's sequence number.
    pub seq: u64,
    /// The node that says so (checked: it must live behind the link the notice came on).
    pub from: NodeId,
    /// Links traversed so far.
    pub hops: u8,
    /// What it says.
    pub kind: NoticeKind,
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Who the peer is; the first frame on every link.
    Hello(Hello),
    /// An envelope with its link sequence number.
    Envelope {
        /// Position among the envelope frames of this link, from zero.
        link_seq: u64,
        /// The envelope.
        envelope: Envelope,
    },
    /// Cumulative acknowledgement: this many envelope frames received.
    Ack(u64),
    /// Routing table changes.
    Routes(RouteUpdate),
    /// A receipt or loss notice on its way to an envelope's origin.
    Notice {
        /// Position among the numbered frames (envelopes and notices) of this link.
        link_seq: u64,
        /// The notice.
        notice: Notice,
    },
    /// A link-level control message for the runtime.
    Control {
        /// The runtime's code.
        code: u32,
        /// Its data.
        data: Vec<u8>,
    },
}

/// Limits applied while decoding bytes from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest frame (kind + body) accepted, in bytes.
    pub max_frame: u32,
    /// Longest name or group name, in bytes.
    pub max_name: usize,
    /// Most names (and, separately, groups) one node's entry of a route update may list.
    pub max_names_per_node: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_frame: 1 << 20,
            max_name: 256,
            max_names_per_node: 64,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Appends frames to a buffer; every function returns the frame's length on the wire.
struct FrameWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> FrameWriter<'a> {
    fn begin(out: &'a mut Vec<u8>, kind: u8) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, kind]);
        Self { out, start }
    }

    fn uint(&mut self, v: u64) {
        put_head(self.out, UINT, v);
    }

    fn array(&mut self, n: usize) {
        put_head(self.out, ARRAY, n as u64);
    }

    fn bytes(&mut self, b: &[u8]) {
        put_head(self.out, BYTES, b.len() as u64);
        self.out.extend_from_slice(b);
    }

    fn text(&mut self, s: &str) {
        put_head(self.out, TEXT, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn node(&mut self, n: NodeId) {
        self.uint(n.host.into());
        self.uint(n.pid.into());
        self.uint(n.incarnation.into());
    }

    fn texts(&mut self, v: &[String]) {
        self.array(v.len());
        for s in v {
            self.text(s);
        }
    }

    fn finish(self) -> usize {
        let len = self.out.len() - self.start;
        let body = u32::try_from(len - 4).unwrap_or(u32::MAX);
        self.out[self.start..self.start + 4].copy_from_slice(&body.to_be_bytes());
        len
    }
}

/// Appends an envelope frame; returns its length on the wire.
pub fn encode_envelope(out: &mut Vec<u8>, link_seq: u64, env: &Envelope) -> usize {
    let mut w = FrameWriter::begin(out, KIND_ENVELOPE);
    let dst_fields = match env.destination {
        Destination::Node(_) => 3,
        Destination::Name(_) | Destination::Group(_) => 1,
        Destination::NameAt { .. } => 4,
        Destination::Broadcast => 0,
    };
    let traced = env.flags.contains(Flags::TRACE);
    w.array(10 + dst_fields + usize::from(traced));
    w.uint(link_seq);
    w.node(env.id.origin);
    w.uint(env.id.seq);
    w.uint(env.hops.into());
    w.uint(env.hop_limit.into());
    w.uint(env.flags.bits().into());
    match &env.destination {
        Destination::Node(n) => {
            w.uint(0);
            w.node(*n);
        }
        Destination::Name(s) => {
            w.uint(1);
            w.text(s);
        }
        Destination::Group(s) => {
            w.uint(2);
            w.text(s);
        }
        Destination::Broadcast => w.uint(3),
        Destination::NameAt { name, node } => {
            w.uint(4);
            w.text(name);
            w.node(*node);
        }
    }
    w.bytes(&env.payload);
    if traced {
        w.array(env.trace.len());
        for hop in &env.trace {
            w.array(5);
            w.node(hop.node);
            w.uint(hop.link.map_or(0, |l| u64::from(l) + 1));
            w.uint(hop.at.as_nanos());
        }
    }
    w.finish()
}

/// Appends any frame; returns its length on the wire.
pub fn encode_frame(out: &mut Vec<u8>, frame: &Frame) -> usize {
    match frame {
        Frame::Envelope { link_seq, envelope } => encode_envelope(out, *link_seq, envelope),
        Frame::Hello(h) => {
            let mut w = FrameWriter::begin(out, KIND_HELLO);
            w.array(5);
            w.uint(MAGIC.into());
            w.uint(h.version.into());
            w.node(h.node);
            w.finish()
        }
        Frame::Ack(n) => {
            let mut w = FrameWriter::begin(out, KIND_ACK);
            w.array(1);
            w.uint(*n);
            w.finish()
        }
        Frame::Routes(update) => {
            let mut w = FrameWriter::begin(out, KIND_ROUTES);
            w.array(3);
            w.array(update.upsert.len());
            for info in &update.upsert {
                w.array(6);
                w.node(info.node);
                w.uint(info.version);
                w.texts(&info.names);
                w.texts(&info.groups);
            }
            w.array(update.remove.len());
            for n in &update.remove {
                w.array(3);
                w.node(*n);
            }
            w.array(update.change.len());
            for d in &update.change {
                w.array(8);
                w.node(d.node);
                w.uint(d.version);
                w.texts(&d.add_names);
                w.texts(&d.remove_names);
                w.texts(&d.join_groups);
                w.texts(&d.leave_groups);
            }
            w.finish()
        }
        Frame::Notice {
            link_seq,
            notice: n,
        } => {
            let mut w = FrameWriter::begin(out, KIND_NOTICE);
            let args = match n.kind {
                NoticeKind::Delivered => 0,
                NoticeKind::Lost { .. } => 2,
                NoticeKind::Moved(_) => 3,
            };
            w.array(10 + args);
            w.uint(*link_seq);
            w.node(n.origin);
            w.uint(n.seq);
            w.node(n.from);
            w.uint(n.hops.into());
            match n.kind {
                NoticeKind::Delivered => w.uint(0),
                NoticeKind::Lost { fate, receipt } => {
                    w.uint(1);
                    w.uint(fate.code());
                    w.uint(receipt.into());
                }
                NoticeKind::Moved(to) => {
                    w.uint(2);
                    w.node(to);
                }
            }
            w.finish()
        }
        Frame::Control { code, data } => {
            let mut w = FrameWriter::begin(out, KIND_CONTROL);
            w.array(2);
            w.uint((*code).into());
            w.bytes(data);
            w.finish()
        }
    }
}

/// The length an envelope frame will have on the wire, computed without encoding it.
pub fn envelope_frame_len(link_seq: u64, env: &Envelope) -> usize {
    let node = |n: NodeId| {
        uint_len(n.host.into()) + uint_len(n.pid.into()) + uint_len(n.incarnation.into())
    };
    let text = |s: &str| uint_len(s.len() as u64) + s.len();
    let dst = match &env.destination {
        Destination::Node(n) => node(*n),
        Destination::Name(s) | Destination::Group(s) => text(s),
        Destination::NameAt { name, node: n } => text(name) + node(*n),
        Destination::Broadcast => 0,
    };
    let traced = env.flags.contains(Flags::TRACE);
    let mut len = FRAME_HEADER_LEN
        + 1 // array header: at most 13 items
        + uint_len(link_seq)
        + node(env.id.origin)
        + uint_len(env.id.seq)
        + uint_len(env.hops.into())
        + uint_len(env.hop_limit.into())
        + uint_len(env.flags.bits().into())
        + 1 // destination kind
        + dst
        + uint_len(env.payload.len() as u64)
        + env.payload.len();
    if traced {
        len += uint_len(env.trace.len() as u64);
        for hop in &env.trace {
            len += 1
                + node(hop.node)
                + uint_len(hop.link.map_or(0, |l| u64::from(l) + 1))
                + uint_len(hop.at.as_nanos());
        }
    }
    len
}

/// Bytes CBOR needs for an unsigned integer (or a length head) of this value.
const fn uint_len(v: u64) -> usize {
    head_len(v)
}

/// Bytes of an acknowledgement frame, whose count is always 8 bytes wide so that a queued
/// acknowledgement not yet written can be raised in place.
pub const ACK_FRAME_LEN: usize = 15;

/// Appends an acknowledgement frame with a fixed-width count; returns the offset of the count
/// within `out` (for [`raise_ack`]).
pub fn encode_ack_fixed(out: &mut Vec<u8>, cumulative: u64) -> usize {
    out.extend_from_slice(&((ACK_FRAME_LEN - 4) as u32).to_be_bytes());
    out.extend_from_slice(&[KIND_ACK, 0x81, 0x1b]);
    let at = out.len();
    out.extend_from_slice(&cumulative.to_be_bytes());
    at
}

/// Overwrites the count of an acknowledgement written by [`encode_ack_fixed`].
pub fn raise_ack(out: &mut [u8], at: usize, cumulative: u64) {
    if let Some(slot) = out.get_mut(at..at + 8) {
        slot.copy_from_slice(&cumulative.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reads CBOR items from a frame body, one header at a time, without copying the body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: DecodeLimits,
}

type Result<T> = std::result::Result<T, ProtocolError>;

impl<'a> Reader<'a> {
    /// The next head, which must be of this major type; its argument.
    #[inline]
    fn head(&mut self, major: u8, what: &'static str) -> Result<u64> {
        match read_head(self.buf, &mut self.pos) {
            Some((m, v)) if m == major => Ok(v),
            _ => Err(ProtocolError::Malformed(what)),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    #[inline]
    fn uint(&mut self, what: &'static str) -> Result<u64> {
        self.head(UINT, what)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        u32::try_from(self.uint(what)?).map_err(|_| ProtocolError::Malformed(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        u8::try_from(self.uint(what)?).map_err(|_| ProtocolError::Malformed(what))
    }

    fn node(&mut self, what: &'static str) -> Result<NodeId> {
        Ok(NodeId::new(
            self.u32(what)?,
            self.u32(what)?,
            self.u32(what)?,
        ))
    }

    /// An array head with a length no larger than the bytes left (every item takes at least
    /// one byte), so the count is safe to allocate for.
    fn array(&mut self, what: &'static str) -> Result<usize> {
        match usize::try_from(self.head(ARRAY, what)?) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(ProtocolError::Malformed(what)),
        }
    }

    fn array_of(&mut self, n: usize, what: &'static str) -> Result<()> {
        if self.array(what)? == n {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(what))
        }
    }

    /// The contents of a string of this major type, no longer than `max`.
    fn string(&mut self, major: u8, max: usize, what: &'static str) -> Result<&'a [u8]> {
        let n = usize::try_from(self.head(major, what)?).unwrap_or(usize::MAX);
        if n > self.remaining() || n > max {
            return Err(ProtocolError::Malformed(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn bytes_slice(&mut self, what: &'static str) -> Result<&'a [u8]> {
        self.string(BYTES, usize::MAX, what)
    }

    fn text(&mut self, what: &'static str) -> Result<String> {
        let s = self.string(TEXT, self.limits.max_name, what)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::Malformed(what))
    }

    fn texts(&mut self, what: &'static str) -> Result<Vec<String>> {
        let n = self.array(what)?;
        if n > self.limits.max_names_per_node {
            return Err(ProtocolError::TooManyNames {
                max: self.limits.max_names_per_node,
            });
        }
        let mut v = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            v.push(self.text(what)?);
        }
        Ok(v)
    }

    fn end(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("trailing bytes"))
        }
    }
}

/// Decodes one frame from its kind byte and body (as split by [`Deframer`]).
pub fn decode_frame(kind: u8, body: &[u8], limits: DecodeLimits) -> Result<Frame> {
    let mut r = Reader {
        buf: body,
        pos: 0,
        limits,
    };
    let frame = match kind {
        KIND_HELLO => {
            r.array_of(5, "hello")?;
            if r.uint("magic")? != u64::from(MAGIC) {
                return Err(ProtocolError::BadMagic);
            }
            let version = r.u32("version")?;
            Frame::Hello(Hello {
                version,
                node: r.node("hello node")?,
            })
        }
        KIND_ENVELOPE => decode_envelope(&mut r)?,
        KIND_ACK => {
            r.array_of(1, "ack")?;
            Frame::Ack(r.uint("ack")?)
        }
        KIND_ROUTES => {
            r.array_of(3, "routes")?;
            let n = r.array("upserts")?;
            // Reserve for what a frame of this size can really hold, not what it claims.
            let mut upsert = Vec::with_capacity(n.min(r.remaining() / 8));
            for _ in 0..n {
                r.array_of(6, "upsert")?;
                upsert.push(NodeInfo {
                    node: r.node("upsert node")?,
                    version: r.uint("upsert version")?,
                    names: r.texts("names")?,
                    groups: r.texts("groups")?,
                });
            }
            let n = r.array("removals")?;
            let mut remove = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                r.array_of(3, "removal")?;
                remove.push(r.node("removal")?);
            }
            let n = r.array("changes")?;
            let mut change = Vec::with_capacity(n.min(r.remaining() / 10));
            for _ in 0..n {
                r.array_of(8, "change")?;
                change.push(NodeDelta {
                    node: r.node("change node")?,
                    version: r.uint("change version")?,
                    add_names: r.texts("added names")?,
                    remove_names: r.texts("removed names")?,
                    join_groups: r.texts("joined groups")?,
                    leave_groups: r.texts("left groups")?,
                });
            }
            Frame::Routes(RouteUpdate {
                upsert,
                remove,
                change,
            })
        }
        KIND_NOTICE => {
            let n = r.array("notice")?;
            let link_seq = r.uint("notice link seq")?;
            let origin = r.node("notice origin")?;
            let seq = r.uint("notice seq")?;
            let from = r.node("notice sender")?;
            let hops = r.u8("notice hops")?;
            let kind = match (n, r.uint("notice kind")?) {
                (10, 0) => NoticeKind::Delivered,
                (12, 1) => NoticeKind::Lost {
                    fate: Fate::from_code(r.uint("notice fate")?)
                        .ok_or(ProtocolError::Malformed("notice fate"))?,
                    receipt: match r.uint("notice receipt")? {
                        0 => false,
                        1 => true,
                        _ => return Err(ProtocolError::Malformed("notice receipt")),
                    },
                },
                (13, 2) => NoticeKind::Moved(r.node("notice holder")?),
                _ => return Err(ProtocolError::Malformed("notice kind")),
            };
            Frame::Notice {
                link_seq,
                notice: Notice {
                    origin,
                    seq,
                    from,
                    hops,
                    kind,
                },
            }
        }
        KIND_CONTROL => {
            r.array_of(2, "control")?;
            let code = r.u32("control code")?;
            Frame::Control {
                code,
                data: r.bytes_slice("control data")?.to_vec(),
            }
        }
        other => return Err(ProtocolError::UnknownFrameKind(other)),
    };
    r.end()?;
    Ok(frame)
}

fn decode_envelope(r: &mut Reader<'_>) -> Result<Frame> {
    let n = r.array("envelope")?;
    let link_seq = r.uint("link seq")?;
    let origin = r.node("origin")?;
    let seq = r.uint("seq")?;
    if seq == u64::MAX {
        // One past every sequence number a node can use: seen windows count up to it.
        return Err(ProtocolError::Malformed("seq"));
    }
    let hops = r.u8("hops")?;
    let hop_limit = r.u8("hop limit")?;
    let flags = Flags::from_bits(r.u8("flags")?).ok_or(ProtocolError::Malformed("flags"))?;
    let (destination, dst_fields) = match r.uint("destination kind")? {
        0 => (Destination::Node(r.node("destination")?), 3),
        1 => (Destination::Name(r.text("destination name")?), 1),
        2 => (Destination::Group(r.text("destination group")?), 1),
        3 => (Destination::Broadcast, 0),
        4 => (
            Destination::NameAt {
                name: r.text("destination name")?,
                node: r.node("destination holder")?,
            },
            4,
        ),
        _ => return Err(ProtocolError::Malformed("destination kind")),
    };
    let traced = flags.contains(Flags::TRACE);
    if n != 10 + dst_fields + usize::from(traced) {
        return Err(ProtocolError::Malformed("envelope length"));
    }
    let payload = r.bytes_slice("payload")?.to_vec();
    let mut trace = Vec::new();
    if traced {
        let n = r.array("trace")?;
        if n > usize::from(hops) + 1 {
            return Err(ProtocolError::Malformed("trace longer than hops"));
        }
        trace.reserve_exact(n);
        for _ in 0..n {
            r.array_of(5, "hop")?;
            let node = r.node("hop node")?;
            let link = match r.uint("hop link")? {
                0 => None,
                l => Some(u32::try_from(l - 1).map_err(|_| ProtocolError::Malformed("hop link"))?),
            };
            let at = Timestamp::from_nanos(r.uint("hop time")?);
            trace.push(Hop { node, link, at });
        }
    }
    Ok(Frame::Envelope {
        link_seq,
        envelope: Envelope {
            id: MessageId { origin, seq },
            destination,
            hops,
            hop_limit,
            flags,
            trace,
            payload,
        },
    })
}

/// Splits a byte stream into frames, whatever the split of the bytes it is fed.
///
/// Complete frames are handed out straight from the input slice; only the tail of a frame
/// split across reads is copied, and that copy never exceeds the frame limit.
#[derive(Debug)]
pub struct Deframer {
    partial: Vec<u8>,
    max_frame: u32,
}

impl Deframer {
    /// A deframer refusing frames longer than `max_frame` (kind + body).
    pub fn new(max_frame: u32) -> Self {
        Self {
            partial: Vec::new(),
            max_frame,
        }
    }

    /// Bytes held of a frame not yet complete.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    fn check_len(&self, prefix: [u8; 4]) -> Result<usize> {
        let len = u32::from_be_bytes(prefix);
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(len as usize)
    }

    /// Feeds bytes; calls `on_frame(kind, body)` for every complete frame, in order.
    ///
    /// Stops at the first error (of the stream or of `on_frame`); the deframer is then in no
    /// defined state and the link must be closed.
    pub fn feed<E: From<ProtocolError>>(
        &mut self,
        mut input: &[u8],
        mut on_frame: impl FnMut(u8, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        if !self.partial.is_empty() {
            // Complete the length prefix first, then the frame, from the new input.
            if self.partial.len() < 4 {
                let take = (4 - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < 4 {
                    return Ok(());
                }
            }
            let prefix = [
                self.partial[0],
                self.partial[1],
                self.partial[2],
                self.partial[3],
            ];
            let total = 4 + self.check_len(prefix)?;
            let take = (total - self.partial.len()).min(input.len());
            self.partial.reserve_exact(total - self.partial.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() < total {
                return Ok(());
            }
            let frame = std::mem::take(&mut self.partial);
            on_frame(frame[4], &frame[5..])?;
            // Keep the allocation for the next split frame, if it was small.
            if frame.capacity() <= 4096 {
                self.partial = frame;
                self.partial.clear();
            }
        }
        while input.len() >= 4 {
            let len = self.check_len([input[0], input[1], input[2], input[3]])?;
            if input.len() < 4 + len {
                break;
            }
            on_frame(input[4], &input[5..4 + len])?;
            input = &input[4 + len..];
        }
        self.partial.extend_from_slice(input);
        Ok(())
    }
}

/// Decodes a whole byte stream into frames: the deframer and the frame decoder together, as
/// the router runs them on a link's input (used by the fuzz targets and tests).
pub fn decode_stream(bytes: &[u8], limits: DecodeLimits) -> Result<Vec<Frame>> {
    let mut frames = Vec::new();
    let mut deframer = Deframer::new(limits.max_frame);
    deframer.feed(bytes, |kind, body| {
        frames.push(decode_frame(kind, body, limits)?);
        Ok::<_, ProtocolError>(())
    })?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{LossReason, UnknownReason};

    fn node(pid: u32) -> NodeId {
        NodeId::new(0, pid, 7)
    }

    fn sample(dst: Destination, traced: bool) -> Envelope {
        Envelope {
            id: MessageId {
                origin: node(10),
                seq: 99,
            },
            destination: dst,
            hops: 2,
            hop_limit: 16,
            flags: if traced {
                Flags::TRACE.with(Flags::RECEIPT)
            } else {
                Flags::empty()
            },
            trace: if traced {
                vec![
                    Hop {
                        node: node(10),
                        link: None,
                        at: Timestamp::from_nanos(5),
                    },
                    Hop {
                        node: node(11),
                        link: Some(3),
                        at: Timestamp::from_nanos(9),
                    },
                ]
            } else {
                Vec::new()
            },
            payload: vec![0xab; 64],
        }
    }

    fn all_frames() -> Vec<Frame> {
        let mut v: Vec<Frame> = [
            Destination::Node(node(4)),
            Destination::Name("model-a".into()),
            Destination::Group("shard".into()),
            Destination::Broadcast,
            Destination::NameAt {
                name: "w".into(),
                node: node(9),
            },
        ]
        .into_iter()
        .enumerate()
        .map(|(i, d)| Frame::Envelope {
            link_seq: i as u64 * 1000,
            envelope: sample(d, i % 2 == 0),
        })
        .collect();
        v.push(Frame::Hello(Hello {
            version: WIRE_VERSION,
            node: node(1),
        }));
        v.push(Frame::Ack(u64::MAX));
        v.push(Frame::Routes(RouteUpdate {
            upsert: vec![NodeInfo {
                node: node(2),
                version: 3,
                names: vec!["a".into(), "b".into()],
                groups: vec!["g".into()],
            }],
            remove: vec![node(3)],
            change: vec![NodeDelta {
                node: node(4),
                version: 9,
                add_names: vec!["n".into()],
                remove_names: vec!["o".into(), "p".into()],
                join_groups: Vec::new(),
                leave_groups: vec!["h".into()],
            }],
        }));
        for kind in [
            NoticeKind::Delivered,
            NoticeKind::Lost {
                fate: Fate::Lost(LossReason::NoRoute),
                receipt: true,
            },
            NoticeKind::Lost {
                fate: Fate::Unknown(UnknownReason::Timeout),
                receipt: false,
            },
            NoticeKind::Moved(node(6)),
        ] {
            v.push(Frame::Notice {
                link_seq: 77,
                notice: Notice {
                    origin: node(1),
                    seq: 1 << 33,
                    from: node(5),
                    hops: 3,
                    kind,
                },
            });
        }
        v.push(Frame::Control {
            code: 7,
            data: b"drain".to_vec(),
        });
        v
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let mut buf = Vec::new();
            let len = encode_frame(&mut buf, &f);
            assert_eq!(len, buf.len());
            let decoded = decode_stream(&buf, DecodeLimits::default()).expect("decodes");
            assert_eq!(decoded, vec![f]);
        }
    }

    /// A CBOR item as `ciborium-ll` sees it.
    #[derive(Debug, PartialEq)]
    enum Item {
        Uint(u64),
        Bytes(Vec<u8>),
        Text(String),
        Array(Vec<Self>),
    }

    fn ll_read(dec: &mut ciborium_ll::Decoder<&[u8]>) -> Item {
        use ciborium_ll::Header;
        match dec.pull().expect("ciborium-ll reads our head") {
            Header::Positive(v) => Item::Uint(v),
            Header::Bytes(Some(n)) => {
                let mut b = vec![0; n];
                ciborium_io::Read::read_exact(dec, &mut b).expect("bytes");
                Item::Bytes(b)
            }
            Header::Text(Some(n)) => {
                let mut b = vec![0; n];
                ciborium_io::Read::read_exact(dec, &mut b).expect("text");
                Item::Text(String::from_utf8(b).expect("utf-8"))
            }
            Header::Array(Some(n)) => Item::Array((0..n).map(|_| ll_read(dec)).collect()),
            other => panic!("a head the wire never writes: {other:?}"),
        }
    }

    fn ll_write(enc: &mut ciborium_ll::Encoder<&mut Vec<u8>>, item: &Item) {
        use ciborium_ll::Header;
        match item {
            Item::Uint(v) => enc.push(Header::Positive(*v)).expect("vec"),
            Item::Bytes(b) => enc.bytes(b, None).expect("vec"),
            Item::Text(t) => enc.text(t, None).expect("vec"),
            Item::Array(v) => {
                enc.push(Header::Array(Some(v.len()))).expect("vec");
                for i in v {
                    ll_write(enc, i);
                }
            }
        }
    }

    #[test]
    fn every_body_is_the_cbor_ciborium_reads_and_writes() {
        let mut frames = all_frames();
        frames.push(Frame::Envelope {
            link_seq: u64::MAX,
            envelope: Envelope {
                payload: vec![3; 70_000],
                ..sample(Destination::Name("x".repeat(300)), true)
            },
        });
        for f in frames {
            let mut ours = Vec::new();
            encode_frame(&mut ours, &f);
            let body = &ours[FRAME_HEADER_LEN..];
            let mut dec = ciborium_ll::Decoder::from(body);
            let item = ll_read(&mut dec);
            assert_eq!(dec.offset(), body.len(), "{f:?}");
            let mut theirs = Vec::new();
            ll_write(&mut ciborium_ll::Encoder::from(&mut theirs), &item);
            assert_eq!(theirs, body, "ciborium encodes {f:?} to the same bytes");
        }
    }

    #[test]
    fn frame_len_prediction_is_exact() {
        for f in all_frames() {
            if let Frame::Envelope { link_seq, envelope } = &f {
                for size in [0usize, 23, 24, 255, 256, 70_000] {
                    let mut e = envelope.clone();
                    e.payload = vec![1; size];
                    let mut buf = Vec::new();
                    encode_envelope(&mut buf, *link_seq, &e);
                    assert_eq!(envelope_frame_len(*link_seq, &e), buf.len(), "size {size}");
                    for seq in [0, 23, 24, 1 << 20, u64::MAX] {
                        let mut buf = Vec::new();
                        encode_envelope(&mut buf, seq, &e);
                        assert_eq!(envelope_frame_len(seq, &e), buf.len(), "seq {seq}");
                    }
                }
            }
        }
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_frames() {
        let frames = all_frames();
        let mut stream = Vec::new();
        for f in &frames {
            encode_frame(&mut stream, f);
        }
        for chunk in 1..=stream.len() {
            let mut deframer = Deframer::new(1 << 20);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                deframer
                    .feed(piece, |k, b| {
                        got.push(decode_frame(k, b, DecodeLimits::default())?);
                        Ok::<_, ProtocolError>(())
                    })
                    .expect("valid stream");
            }
            assert_eq!(got, frames, "chunk size {chunk}");
            assert_eq!(deframer.buffered(), 0);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_its_bytes_arrive() {
        let mut deframer = Deframer::new(100);
        let err = deframer
            .feed(&101u32.to_be_bytes(), |_, _| Ok::<_, ProtocolError>(()))
            .expect_err("too large");
        assert_eq!(err, ProtocolError::FrameTooLarge { len: 101, max: 100 });
        // Split prefix: refused as soon as the fourth byte arrives.
        let mut deframer = Deframer::new(100);
        let big = u32::MAX.to_be_bytes();
        deframer
            .feed(&big[..2], |_, _| Ok::<_, ProtocolError>(()))
            .expect("incomplete prefix");
        assert!(deframer
            .feed(&big[2..], |_, _| Ok::<_, ProtocolError>(()))
            .is_err());
        assert!(deframer.buffered() <= 4);
    }

    #[test]
    fn fixed_width_ack_decodes_and_rises_in_place() {
        let mut buf = vec![9, 9];
        let at = encode_ack_fixed(&mut buf, 3);
        assert_eq!(buf.len(), 2 + ACK_FRAME_LEN);
        raise_ack(&mut buf, at, 1 << 40);
        assert_eq!(
            decode_stream(&buf[2..], DecodeLimits::default()),
            Ok(vec![Frame::Ack(1 << 40)])
        );
    }

    #[test]
    fn announcements_listing_too_many_names_are_refused() {
        let limits = DecodeLimits {
            max_names_per_node: 2,
            ..DecodeLimits::default()
        };
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Frame::Routes(RouteUpdate {
                upsert: vec![NodeInfo {
                    node: node(2),
                    version: 1,
                    names: vec!["a".into(), "b".into(), "c".into()],
                    groups: Vec::new(),
                }],
                ..RouteUpdate::default()
            }),
        );
        assert!(decode_stream(&buf, limits).is_err());
        assert!(decode_stream(&buf, DecodeLimits::default()).is_ok());
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        assert_eq!(
            decode_stream(&[0, 0, 0, 0], DecodeLimits::default()),
            Err(ProtocolError::EmptyFrame)
        );
    }

    #[test]
    fn truncated_and_padded_bodies_are_malformed() {
        for f in all_frames() {
            let mut buf = Vec::new();
            encode_frame(&mut buf, &f);
            let body = &buf[5..];
            for cut in 0..body.len() {
                assert!(
                    decode_frame(buf[4], &body[..cut], DecodeLimits::default()).is_err(),
                    "{f:?} cut at {cut}"
                );
            }
            let mut padded = body.to_vec();
            padded.push(0);
            assert_eq!(
                decode_frame(buf[4], &padded, DecodeLimits::default()),
                Err(ProtocolError::Malformed("trailing bytes"))
            );
        }
    }

    #[test]
    fn unknown_kinds_and_flags_are_refused() {
        assert_eq!(
            decode_frame(9, &[0x80], DecodeLimits::default()),
            Err(ProtocolError::UnknownFrameKind(9))
        );
        assert_eq!(Flags::from_bits(0x80), None);
        // An envelope whose flags byte has an unknown bit: the flags are the 8th item, after
        // the array header, link seq 0, origin (0, 10, 7), seq 99 (2 bytes), hops, hop limit.
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Frame::Envelope {
                link_seq: 0,
                envelope: sample(Destination::Broadcast, false),
            },
        );
        let flags_at = 5 + 1 + 1 + 3 + 2 + 1 + 1;
        assert_eq!(buf[flags_at], 0);
        buf[flags_at] = 0x10;
        assert_eq!(
            decode_stream(&buf, DecodeLimits::default()),
            Err(ProtocolError::Malformed("flags"))
        );
    }

    #[test]
    fn the_last_sequence_number_is_refused() {
        // Found by fuzzing: a seen window counted one past u64::MAX.
        let mut e = sample(Destination::Broadcast, false);
        e.id.seq = u64::MAX;
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Frame::Envelope {
                link_seq: 0,
                envelope: e,
            },
        );
        assert_eq!(
            decode_stream(&buf, DecodeLimits::default()),
            Err(ProtocolError::Malformed("seq"))
        );
    }

    #[test]
    fn long_names_are_refused() {
        let limits = DecodeLimits {
            max_name: 4,
            ..DecodeLimits::default()
        };
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Frame::Envelope {
                link_seq: 0,
                envelope: sample(Destination::Name("toolong".into()), false),
            },
        );
        assert_eq!(
            decode_stream(&buf, limits),
            Err(ProtocolError::Malformed("destination name"))
        );
    }

    #[test]
    fn huge_array_counts_do_not_allocate() {
        // A routes frame announcing 2^32 upserts in a 20-byte body.
        let body = [0x83, 0x9a, 0xff, 0xff, 0xff, 0xff, 0x80, 0x80];
        assert_eq!(
            decode_frame(KIND_ROUTES, &body, DecodeLimits::default()),
            Err(ProtocolError::Malformed("upserts"))
        );
    }

    #[test]
    fn hello_checks_magic() {
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            &Frame::Hello(Hello {
                version: 1,
                node: node(1),
            }),
        );
        // Magic is the second CBOR item: 0x85, 0x1a, then 4 bytes.
        buf[7] ^= 0xff;
        assert_eq!(
            decode_stream(&buf, DecodeLimits::default()),
            Err(ProtocolError::BadMagic)
        );
    }
}

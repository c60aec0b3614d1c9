// Package h2frame follows the frames of an HTTP/2 connection from the
// server's side, byte for byte, without changing any, so that a layer under
// the server (a listener wrapper) can close the connection the way gRPC-Go's
// server does: a GOAWAY, then a PING, and the close once the PING is
// acknowledged and no stream is in flight.
//
// A Tracker reads the frame headers of both directions as they pass: the
// client's (after its connection preface, RFC 9113 section 3.4) and the
// server's (which start with the server's SETTINGS). From them it knows:
//
//   - where the server's output stands: between two frames, inside one, or
//     inside a header block (HEADERS or PUSH_PROMISE without END_HEADERS and
//     its CONTINUATIONs, which no other frame may interrupt, section 6.10),
//     so that frames of its own are written only where a frame may start;
//   - which streams are open: a client stream opens with the client's
//     HEADERS and closes when both sides sent END_STREAM, or either sent
//     RST_STREAM (section 5.1); a stream becomes closed only once the whole
//     frame that closes it has passed, and a HEADERS frame's END_STREAM
//     only once its header block has (the CONTINUATION with END_HEADERS,
//     sections 4.3 and 8.1): a 30KB header-only response, or gRPC's large
//     trailers, end the stream with their last CONTINUATION;
//   - whether the client acknowledged the PING of DrainFrames; from that
//     acknowledgement on, the final GOAWAY's last stream id (FinalGoAway),
//     and which of the client's frames the server must not read: those of
//     streams above it (In withholds them).
//
// It needs no lock of its own for the scanning: In must be called by one
// goroutine at a time (the reader), and Out and ToBoundary by one at a
// time (the writer, under the caller's write lock); the state both share
// (streams, the PING) is under the Tracker's mutex.
package h2frame

import (
	"encoding/binary"
	"sync"
)

// Frame types (RFC 9113 section 6) the tracker acts on.
const (
	TypeData         = 0x0
	TypeHeaders      = 0x1
	TypeRSTStream    = 0x3
	TypeSettings     = 0x4
	TypePushPromise  = 0x5
	TypePing         = 0x6
	TypeGoAway       = 0x7
	TypeContinuation = 0x9
)

// Frame flags.
const (
	FlagEndStream  = 0x1 // DATA, HEADERS
	FlagAck        = 0x1 // SETTINGS, PING
	FlagEndHeaders = 0x4 // HEADERS, PUSH_PROMISE, CONTINUATION
)

// HeaderLen is the length of a frame header.
const HeaderLen = 9

// MaxStreamID is the largest stream identifier, 2^31-1: a GOAWAY with it as
// its last stream id tells the client to open no new stream while those it
// opened, whatever their number, may complete (RFC 9113 section 6.8).
const MaxStreamID = 1<<31 - 1

// ClientPreface is the connection preface every HTTP/2 client sends first.
const ClientPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// ErrCodeNo is the NO_ERROR error code: a graceful shutdown.
const ErrCodeNo = 0x0

// Header is a frame header.
type Header struct {
	Length   uint32 // of the payload, 24 bits
	Type     uint8
	Flags    uint8
	StreamID uint32 // 31 bits; the reserved bit is dropped
}

// ParseHeader reads a frame header from the first HeaderLen bytes of b.
func ParseHeader(b []byte) Header {
	_ = b[HeaderLen-1]
	return Header{
		Length:   uint32(b[0])<<16 | uint32(b[1])<<8 | uint32(b[2]),
		Type:     b[3],
		Flags:    b[4],
		StreamID: binary.BigEndian.Uint32(b[5:9]) & MaxStreamID,
	}
}

// AppendHeader appends the header h to b.
func AppendHeader(b []byte, h Header) []byte {
	return append(b, byte(h.Length>>16), byte(h.Length>>8), byte(h.Length), h.Type, h.Flags,
		byte(h.StreamID>>24)&0x7f, byte(h.StreamID>>16), byte(h.StreamID>>8), byte(h.StreamID))
}

// AppendGoAway appends a GOAWAY frame (no debug data) to b.
func AppendGoAway(b []byte, lastStreamID, code uint32) []byte {
	b = AppendHeader(b, Header{Length: 8, Type: TypeGoAway})
	b = binary.BigEndian.AppendUint32(b, lastStreamID&MaxStreamID)
	return binary.BigEndian.AppendUint32(b, code)
}

// AppendPing appends a PING frame with data to b, an acknowledgement when ack.
func AppendPing(b []byte, data [8]byte, ack bool) []byte {
	var flags uint8
	if ack {
		flags = FlagAck
	}
	b = AppendHeader(b, Header{Length: 8, Type: TypePing, Flags: flags})
	return append(b, data[:]...)
}

// scanner follows the frames of one direction of the byte stream.
type scanner struct {
	hdr     [HeaderLen]byte
	hn      int    // bytes of hdr read so far
	cur     Header // the frame whose payload is passing
	left    uint32 // bytes of cur's payload still to come
	inBlock bool   // inside a header block: only CONTINUATION may come next
	// The stream of the header block passing or last passed, and whether
	// its HEADERS carried END_STREAM: that takes effect when the block
	// ends, on the frame with END_HEADERS (RFC 9113 section 8.1), which
	// may be a CONTINUATION that comes in a later write.
	blockStream    uint32
	blockEndStream bool
	// The first 8 bytes of a PING's payload, for the acknowledgement.
	ping  [8]byte
	pingN int
	// Filtering (the client's side, after the final GOAWAY): hold keeps
	// each frame header back until it is whole, when frame decides from
	// it whether the frame passes (drop unset) or is withheld (drop set).
	hold, drop bool
}

// atBoundary reports whether the next byte starts a frame that any frame
// may precede.
func (s *scanner) atBoundary() bool { return s.hn == 0 && s.left == 0 && !s.inBlock }

// scan feeds b[from:] to s, calling frame when a frame header is complete
// and done when a frame's whole payload has passed, and returns the index
// after the bytes consumed: all of b, or when stop, up to the end of the
// first frame that ends (where atBoundary may hold). It also moves the
// bytes that pass to b[to:w], in order, and returns w: all of them, until
// s.hold is set; then each frame header once it is whole (from s.hdr, so
// that up to HeaderLen-1 bytes of it may have come in an earlier call: to
// must then leave room for them, at least HeaderLen-1 bytes before from),
// and each frame that frame did not mark drop.
func (s *scanner) scan(b []byte, from, to int, stop bool, frame, done func(*scanner)) (n, w int) {
	n, w = from, to
	for n < len(b) {
		if s.left > 0 {
			k := int(min(uint32(len(b)-n), s.left))
			if s.cur.Type == TypePing && s.pingN < 8 {
				s.pingN += copy(s.ping[s.pingN:], b[n:n+k])
			}
			if !s.drop {
				if w != n {
					copy(b[w:], b[n:n+k])
				}
				w += k
			}
			s.left -= uint32(k)
			n += k
			if s.left == 0 {
				done(s)
				if stop {
					return n, w
				}
			}
			continue
		}
		k := copy(s.hdr[s.hn:], b[n:])
		s.hn += k
		if !s.hold {
			if w != n {
				copy(b[w:], b[n:n+k])
			}
			w += k
		}
		n += k
		if s.hn < HeaderLen {
			return n, w
		}
		s.hn = 0
		s.cur = ParseHeader(s.hdr[:])
		s.left = s.cur.Length
		s.pingN = 0
		switch s.cur.Type {
		case TypeHeaders:
			s.blockStream, s.blockEndStream = s.cur.StreamID, s.cur.Flags&FlagEndStream != 0
			s.inBlock = s.cur.Flags&FlagEndHeaders == 0
		case TypePushPromise:
			// Its block belongs to the stream it is sent on, which it
			// does not end.
			s.blockStream, s.blockEndStream = s.cur.StreamID, false
			s.inBlock = s.cur.Flags&FlagEndHeaders == 0
		case TypeContinuation:
			s.inBlock = s.cur.Flags&FlagEndHeaders == 0
		}
		s.drop = false
		frame(s)
		if s.hold && !s.drop {
			w += copy(b[w:], s.hdr[:])
		}
		if s.left == 0 {
			done(s)
			if stop {
				return n, w
			}
		}
	}
	return n, w
}

// endsStream reports, for the frame that has just wholly passed, which
// stream it ended (0: none): DATA with END_STREAM, or the last frame of a
// header block whose HEADERS carried END_STREAM. A frame that ends a
// stream inside a header block (only CONTINUATION may come there, section
// 6.10) ends none: nothing may close while a block is open.
func (s *scanner) endsStream() uint32 {
	h := s.cur
	switch h.Type {
	case TypeData:
		if h.Flags&FlagEndStream != 0 && !s.inBlock {
			return h.StreamID
		}
	case TypeHeaders, TypeContinuation:
		if h.Flags&FlagEndHeaders != 0 && s.blockEndStream {
			s.blockEndStream = false
			return s.blockStream
		}
	}
	return 0
}

// Stream states in Tracker.streams: which sides have ended it.
const (
	clientEnded = 1 << iota
	serverEnded
)

// Tracker follows both directions of one HTTP/2 connection, server side.
type Tracker struct {
	in, out scanner
	// prefaceLeft is how much of the client preface is still to come;
	// failed is set when the client's first bytes were not it (not
	// HTTP/2): the tracker then follows nothing.
	prefaceLeft int
	failed      bool

	mu       sync.Mutex
	streams  map[uint32]uint8 // open streams and which sides ended them
	lastPeer uint32           // the highest stream id the client opened
	// The last stream id of the final GOAWAY: lastPeer when the client
	// acknowledged the PING; set (final) from then on.
	last   uint32
	final  bool
	ping   [8]byte // the data of the PING DrainFrames made
	pinged bool    // DrainFrames was called
	acked  bool    // the client acknowledged that PING
}

// NewServer returns a Tracker for the server's side of a connection, from
// its first byte in each direction.
func NewServer() *Tracker {
	return &Tracker{prefaceLeft: len(ClientPreface), streams: make(map[uint32]uint8)}
}

// In follows the bytes the client sent, b[from:], in order, and moves
// those the server is to read to b[:n]: all of them, in place when from is
// 0, until the client has acknowledged the tracker's PING. From that
// acknowledgement on, the client's frames of streams above the final
// GOAWAY's last stream id (FinalGoAway) are withheld: the GOAWAY tells the
// client they were never processed, and that it may send them again
// elsewhere (RFC 9113 section 6.8), so the server must not see them. A
// frame header is then held back until it is whole, so once Refusing
// reports true, from must be at least HeaderLen-1 (room for the part of a
// header an earlier call held back).
//
// It also reports whether this call completed the acknowledgement of the
// tracker's PING.
func (t *Tracker) In(b []byte, from int) (n int, acked bool) {
	if t.failed {
		return copy(b, b[from:]), false
	}
	to := 0
	if t.prefaceLeft > 0 {
		i := len(ClientPreface) - t.prefaceLeft
		k := min(len(b)-from, t.prefaceLeft)
		if string(b[from:from+k]) != ClientPreface[i:i+k] {
			t.failed = true
			return copy(b, b[from:]), false
		}
		t.prefaceLeft -= k
		to = copy(b, b[from:from+k])
		from += k
	}
	_, n = t.in.scan(b, from, to, false, func(s *scanner) {
		h := s.cur
		if s.hold && h.StreamID != 0 {
			t.mu.Lock()
			s.drop = h.StreamID > t.last
			t.mu.Unlock()
			if s.drop {
				return // a stream the server never sees opens nothing
			}
		}
		switch h.Type {
		case TypeHeaders:
			if h.StreamID == 0 {
				return
			}
			// The stream opens with its HEADERS' frame header, before
			// its block has passed: from then on the server may
			// serve it. END_STREAM waits for the block's end.
			t.mu.Lock()
			if _, open := t.streams[h.StreamID]; !open && h.StreamID%2 == 1 && h.StreamID > t.lastPeer {
				t.lastPeer = h.StreamID
				t.streams[h.StreamID] = 0
			}
			t.mu.Unlock()
		}
	}, func(s *scanner) {
		h := s.cur
		if s.drop {
			return
		}
		// A RST_STREAM ends its stream once its payload has passed too,
		// as on the server's side (outDone): the close counts a stream
		// done only when the frame that ended it is the server's to
		// read, not at its header with the rest still to come. Inside
		// a header block it ends nothing: it is a connection error
		// there (section 6.10), which the server answers itself.
		if h.Type == TypeRSTStream && !s.inBlock {
			t.end(h.StreamID, clientEnded|serverEnded)
		} else if id := s.endsStream(); id != 0 {
			t.end(id, clientEnded)
		}
		switch {
		case h.Type == TypePing && h.Flags&FlagAck != 0 && s.pingN == 8:
			t.mu.Lock()
			if t.pinged && !t.acked && s.ping == t.ping {
				// Every stream the client opened before it read the
				// GOAWAY came before this ACK: lastPeer is the last
				// stream the server will see.
				t.acked, acked = true, true
				t.last, t.final = t.lastPeer, true
				s.hold = true
			}
			t.mu.Unlock()
		}
	})
	return n, acked
}

// Refusing reports whether In withholds frames (the PING was
// acknowledged): In's caller must then leave it room before the bytes.
// Only In's caller may call it.
func (t *Tracker) Refusing() bool { return t.in.hold }

// FinalGoAway returns the second GOAWAY, which gRPC-Go's server sends once
// its PING is acknowledged: NO_ERROR, with the highest stream id the client
// opened before its acknowledgement as the last stream id. Streams above
// it, which a client opens after it acknowledged the GOAWAY, are withheld
// from the server (In) and may be retried elsewhere. It returns nil before
// the acknowledgement.
func (t *Tracker) FinalGoAway() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.final {
		return nil
	}
	return AppendGoAway(make([]byte, 0, HeaderLen+8), t.last, ErrCodeNo)
}

// Failed reports whether the client's first bytes were not HTTP/2's
// preface: the tracker follows nothing, and no frame may be written.
func (t *Tracker) Failed() bool { return t.failed }

// Out follows bytes the server wrote, in order. It reports whether this call
// closed the last open stream.
func (t *Tracker) Out(p []byte) (idle bool) {
	t.out.scan(p, 0, 0, false, func(*scanner) {}, func(s *scanner) { idle = t.outDone(s) || idle })
	return idle
}

// outDone takes a server frame that has wholly passed, and reports whether
// it closed the last open stream.
func (t *Tracker) outDone(s *scanner) bool {
	if s.cur.Type == TypeRSTStream && !s.inBlock {
		return t.end(s.cur.StreamID, clientEnded|serverEnded)
	}
	if id := s.endsStream(); id != 0 {
		return t.end(id, serverEnded)
	}
	return false
}

// ToBoundary returns how many bytes of p the server's output needs to reach
// the next point where a frame of the tracker's may be written, following
// them as Out does; len(p) when there is none in p. At a boundary already,
// it returns 0. It also reports whether those bytes closed the last open
// stream.
func (t *Tracker) ToBoundary(p []byte) (n int, idle bool) {
	for n < len(p) && !t.out.atBoundary() {
		k, _ := t.out.scan(p[n:], 0, 0, true, func(*scanner) {}, func(s *scanner) { idle = t.outDone(s) || idle })
		n += k
	}
	return n, idle
}

// AtBoundary reports whether the server's output stands where a frame may
// be written.
func (t *Tracker) AtBoundary() bool { return t.out.atBoundary() }

// end records that sides ended stream id, and reports whether that closed
// the last open stream.
func (t *Tracker) end(id uint32, sides uint8) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, open := t.streams[id]
	if !open {
		return false
	}
	return t.endLocked(id, st|sides)
}

func (t *Tracker) endLocked(id uint32, st uint8) bool {
	if st&(clientEnded|serverEnded) == clientEnded|serverEnded {
		delete(t.streams, id)
		return len(t.streams) == 0
	}
	t.streams[id] = st
	return false
}

// OpenStreams returns how many streams are open.
func (t *Tracker) OpenStreams() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.streams)
}

// LastPeerStream returns the highest stream id the client opened.
func (t *Tracker) LastPeerStream() uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastPeer
}

// DrainFrames returns what the server writes to start a graceful close, as
// gRPC-Go's server does: a GOAWAY (NO_ERROR, last stream id 2^31-1: no new
// streams, those in flight complete), then a PING with data whose
// acknowledgement tells that the client has seen the GOAWAY, and that every
// stream it opened before is known. Call it once.
func (t *Tracker) DrainFrames(data [8]byte) []byte {
	t.mu.Lock()
	t.ping, t.pinged = data, true
	t.mu.Unlock()
	b := AppendGoAway(make([]byte, 0, 2*HeaderLen+16), MaxStreamID, ErrCodeNo)
	return AppendPing(b, data, false)
}

// Acked reports whether the client acknowledged the PING of DrainFrames.
func (t *Tracker) Acked() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.acked
}

package h2frame

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"testing"

	"golang.org/x/net/http2"
)

// serverOutput writes n random server frames with x/net's Framer (DATA of
// random sizes, HEADERS split into CONTINUATIONs, SETTINGS, PING, RST_STREAM,
// WINDOW_UPDATE), and returns the bytes and the offsets where a frame may be
// written: between frames, not inside a header block.
func serverOutput(r *rand.Rand, n int) ([]byte, map[int]bool) {
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	bounds := map[int]bool{0: true}
	block := func(size int) []byte { return bytes.Repeat([]byte{'h'}, size) }
	for range n {
		id := uint32(2*r.IntN(50) + 1)
		switch r.IntN(6) {
		case 0:
			_ = fr.WriteData(id, r.IntN(3) == 0, make([]byte, r.IntN(20000)))
		case 1:
			parts := 1 + r.IntN(3)
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block(r.IntN(300)), EndHeaders: parts == 1, EndStream: r.IntN(2) == 0})
			for i := 1; i < parts; i++ {
				_ = fr.WriteContinuation(id, i == parts-1, block(r.IntN(300)))
			}
		case 2:
			_ = fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100})
		case 3:
			_ = fr.WritePing(r.IntN(2) == 0, [8]byte{1, 2, 3})
		case 4:
			_ = fr.WriteRSTStream(id, http2.ErrCodeCancel)
		case 5:
			_ = fr.WriteWindowUpdate(0, 1000)
		}
		bounds[buf.Len()] = true
	}
	return buf.Bytes(), bounds
}

// The server's output, fed in chunks of random sizes: AtBoundary holds after
// a chunk exactly when the chunk ends between two frames outside a header
// block, and ToBoundary finds each such point.
func TestOutBoundaries(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		out, bounds := serverOutput(r, 200)
		tr := NewServer()
		pos := 0
		for pos < len(out) {
			chunk := out[pos:min(len(out), pos+1+r.IntN(9000))]
			if r.IntN(2) == 0 {
				tr.Out(chunk)
				pos += len(chunk)
			} else {
				n, _ := tr.ToBoundary(chunk)
				if n < len(chunk) && !tr.AtBoundary() {
					t.Fatalf("ToBoundary stopped at %d, not a boundary", pos+n)
				}
				for k := pos + 1; k < pos+n; k++ {
					if bounds[k] {
						t.Fatalf("ToBoundary passed the boundary at %d to stop at %d", k, pos+n)
					}
				}
				pos += n
			}
			if got := tr.AtBoundary(); got != bounds[pos] {
				t.Fatalf("at %d: AtBoundary %v, want %v", pos, got, bounds[pos])
			}
		}
	}
}

// Frames written at the boundaries ToBoundary finds leave a stream that
// x/net's Framer reads back whole: the server's frames in order, with ours
// between them.
func TestInjectedFramesParse(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	out, _ := serverOutput(r, 300)
	tr := NewServer()
	var mixed bytes.Buffer
	injected := 0
	for p := out; len(p) > 0; {
		chunk := p[:min(len(p), 1+r.IntN(5000))]
		n, _ := tr.ToBoundary(chunk)
		mixed.Write(chunk[:n])
		if n < len(chunk) || tr.AtBoundary() {
			mixed.Write(AppendGoAway(nil, MaxStreamID, ErrCodeNo))
			injected++
		}
		tr.Out(chunk[n:])
		mixed.Write(chunk[n:])
		p = p[len(chunk):]
	}
	fr := http2.NewFramer(nil, &mixed)
	fr.SetMaxReadFrameSize(1 << 24)
	goaways := 0
	for {
		f, err := fr.ReadFrame()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("reading the mixed stream: %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			goaways++
			if g.LastStreamID != MaxStreamID || g.ErrCode != http2.ErrCodeNo {
				t.Fatalf("GOAWAY %d %v", g.LastStreamID, g.ErrCode)
			}
		}
	}
	if goaways != injected || injected < 50 {
		t.Fatalf("read %d GOAWAYs, injected %d", goaways, injected)
	}
}

// clientFrames returns the client's preface and frames from w.
func clientFrames(w func(fr *http2.Framer)) []byte {
	var buf bytes.Buffer
	buf.WriteString(ClientPreface)
	w(http2.NewFramer(&buf, nil))
	return buf.Bytes()
}

// inPass gives the client's bytes chunk to tr.In, as a reader does (with room
// before them once tr is refusing), and returns the bytes the server is to
// read; chunk is not changed.
func inPass(tr *Tracker, chunk []byte) (passed []byte, acked bool) {
	from := 0
	if tr.Refusing() {
		from = HeaderLen - 1
	}
	b := append(make([]byte, from, from+len(chunk)), chunk...)
	n, acked := tr.In(b, from)
	return b[:n], acked
}

// feedIn gives b to In a byte at a time or at once, and returns the bytes
// the server is to read.
func feedIn(tr *Tracker, b []byte, bytewise bool) (acked bool) {
	_, acked = feedInPassed(tr, b, bytewise)
	return acked
}

func feedInPassed(tr *Tracker, b []byte, bytewise bool) (passed []byte, acked bool) {
	if !bytewise {
		return inPass(tr, b)
	}
	for i := range b {
		p, a := inPass(tr, b[i:i+1])
		passed = append(passed, p...)
		acked = a || acked
	}
	return passed, acked
}

func TestStreams(t *testing.T) {
	for _, bytewise := range []bool{false, true} {
		tr := NewServer()
		feedIn(tr, clientFrames(func(fr *http2.Framer) {
			_ = fr.WriteSettings()
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: true, EndStream: true})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("x"), EndHeaders: true})
			_ = fr.WriteData(3, true, []byte("body"))
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: []byte("x"), EndHeaders: true})
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 7, BlockFragment: []byte("x"), EndHeaders: true, EndStream: true})
			_ = fr.WriteRSTStream(7, http2.ErrCodeCancel)
		}), bytewise)
		if got := tr.OpenStreams(); got != 3 || tr.LastPeerStream() != 7 {
			t.Fatalf("bytewise %v: %d open streams, last %d; want 3 (1, 3, 5), last 7", bytewise, got, tr.LastPeerStream())
		}
		var out bytes.Buffer
		fr := http2.NewFramer(&out, nil)
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: true})
		_ = fr.WriteData(1, true, make([]byte, 100))
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("x"), EndHeaders: true, EndStream: true})
		b := out.Bytes()
		// The stream closes only once its last frame has wholly passed.
		if idle := tr.Out(b[:len(b)-HeaderLen-1-5]); idle || tr.OpenStreams() != 3 {
			t.Fatalf("after stream 1's DATA but 5 bytes: %d open", tr.OpenStreams())
		}
		tr.Out(b[len(b)-HeaderLen-1-5 : len(b)-HeaderLen-1])
		if got := tr.OpenStreams(); got != 2 {
			t.Fatalf("after stream 1's END_STREAM: %d open, want 2", got)
		}
		tr.Out(b[len(b)-HeaderLen-1:])
		if got := tr.OpenStreams(); got != 1 {
			t.Fatalf("after stream 3's END_STREAM: %d open, want 1", got)
		}
		out.Reset()
		_ = fr.WriteRSTStream(5, http2.ErrCodeCancel)
		if idle := tr.Out(out.Bytes()); !idle || tr.OpenStreams() != 0 {
			t.Fatalf("after RST_STREAM 5: idle %v, %d open", idle, tr.OpenStreams())
		}
	}
}

// A HEADERS frame with END_STREAM but not END_HEADERS ends its stream only
// with the block's last CONTINUATION, in either direction, however the
// bytes split: a header-only response (or gRPC trailers) larger than one
// frame ended the stream, and let the connection close, between its HEADERS
// and its CONTINUATION.
func TestHeaderBlockEndsStream(t *testing.T) {
	block := func(fr *http2.Framer, id uint32) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: make([]byte, 16384), EndStream: true})
		_ = fr.WriteContinuation(id, false, make([]byte, 10000))
		_ = fr.WriteContinuation(id, true, make([]byte, 4000))
	}
	var out bytes.Buffer
	block(http2.NewFramer(&out, nil), 1)
	srv := out.Bytes()
	in := clientFrames(func(fr *http2.Framer) { block(fr, 1) })
	last := len(srv) - HeaderLen - 4000 // the last CONTINUATION's start
	for _, bytewise := range []bool{false, true} {
		// The server's block: the stream stays open until its last byte.
		tr := NewServer()
		feedIn(tr, clientFrames(func(fr *http2.Framer) {
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: true, EndStream: true})
		}), bytewise)
		if tr.OpenStreams() != 1 {
			t.Fatalf("bytewise %v: %d open streams, want 1", bytewise, tr.OpenStreams())
		}
		for i, p := range [][]byte{srv[:HeaderLen+16384], srv[HeaderLen+16384 : last], srv[last : len(srv)-1]} {
			if idle := feedOut(tr, p, bytewise); idle || tr.OpenStreams() != 1 || tr.AtBoundary() {
				t.Fatalf("bytewise %v: after part %d of the block: idle %v, %d open, at a boundary %v; want the stream open, inside the block",
					bytewise, i, idle, tr.OpenStreams(), tr.AtBoundary())
			}
		}
		if idle := feedOut(tr, srv[len(srv)-1:], bytewise); !idle || tr.OpenStreams() != 0 || !tr.AtBoundary() {
			t.Fatalf("bytewise %v: after the block: idle %v, %d open", bytewise, idle, tr.OpenStreams())
		}

		// The client's block: its END_STREAM, too, waits for the end.
		tr = NewServer()
		feedIn(tr, in[:len(in)-1], bytewise)
		tr.Out(func() []byte {
			var b bytes.Buffer
			_ = http2.NewFramer(&b, nil).WriteData(1, true, nil)
			return b.Bytes()
		}())
		if tr.OpenStreams() != 1 {
			t.Fatalf("bytewise %v: the server ended stream 1, the client's block has a byte to come: %d open, want 1", bytewise, tr.OpenStreams())
		}
		feedIn(tr, in[len(in)-1:], bytewise)
		if tr.OpenStreams() != 0 {
			t.Fatalf("bytewise %v: after the client's block: %d open, want 0", bytewise, tr.OpenStreams())
		}
	}
}

// A RST_STREAM ends its stream once its whole frame has passed, in either
// direction, and inside a header block (a connection error, RFC 9113
// section 6.10) not at all. The client's ended it at its frame header: the
// close could come with the rest of the frame unread by the server (found
// by FuzzTracker).
func TestResetEndsAtFrameEnd(t *testing.T) {
	open1 := func(fr *http2.Framer) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: true})
	}
	var rst bytes.Buffer
	_ = http2.NewFramer(&rst, nil).WriteRSTStream(1, http2.ErrCodeCancel)
	r := rst.Bytes()
	for _, bytewise := range []bool{false, true} {
		for _, client := range []bool{true, false} {
			tr := NewServer()
			feedIn(tr, clientFrames(open1), bytewise)
			feed := func(b []byte) {
				if client {
					feedIn(tr, b, bytewise)
				} else {
					feedOut(tr, b, bytewise)
				}
			}
			feed(r[:len(r)-1])
			if tr.OpenStreams() != 1 {
				t.Fatalf("bytewise %v, client %v: a RST_STREAM but its last byte closed the stream", bytewise, client)
			}
			feed(r[len(r)-1:])
			if tr.OpenStreams() != 0 {
				t.Fatalf("bytewise %v, client %v: after the whole RST_STREAM: %d open, want 0", bytewise, client, tr.OpenStreams())
			}
		}

		// Inside a header block of its own direction, a reset ends
		// nothing.
		tr := NewServer()
		feedIn(tr, clientFrames(func(fr *http2.Framer) {
			open1(fr)
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("x")})
		}), bytewise)
		feedIn(tr, r, bytewise)
		if tr.OpenStreams() != 2 {
			t.Fatalf("bytewise %v: a client's RST_STREAM inside its header block: %d open, want 2", bytewise, tr.OpenStreams())
		}
		tr = NewServer()
		feedIn(tr, clientFrames(open1), bytewise)
		var blk bytes.Buffer
		_ = http2.NewFramer(&blk, nil).WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x")})
		feedOut(tr, append(blk.Bytes(), r...), bytewise)
		if tr.OpenStreams() != 1 {
			t.Fatalf("bytewise %v: a server's RST_STREAM inside its header block: %d open, want 1", bytewise, tr.OpenStreams())
		}
	}
}

// feedOut gives b to Out a byte at a time or at once, and reports whether
// it closed the last open stream.
func feedOut(tr *Tracker, b []byte, bytewise bool) (idle bool) {
	if !bytewise {
		return tr.Out(b)
	}
	for i := range b {
		idle = tr.Out(b[i:i+1]) || idle
	}
	return idle
}

func TestPingAck(t *testing.T) {
	for _, bytewise := range []bool{false, true} {
		tr := NewServer()
		data := [8]byte{'t', 'c', 'p', 'o', 'p', 's', 1, 2}
		frames := tr.DrainFrames(data)
		fr := http2.NewFramer(nil, bytes.NewReader(frames))
		if f, err := fr.ReadFrame(); err != nil || f.Header().Type != http2.FrameGoAway {
			t.Fatalf("first frame: %v %v", f, err)
		}
		if f, err := fr.ReadFrame(); err != nil || f.(*http2.PingFrame).Data != data || f.(*http2.PingFrame).IsAck() {
			t.Fatalf("second frame: %v %v", f, err)
		}
		in := clientFrames(func(fr *http2.Framer) {
			_ = fr.WritePing(true, [8]byte{9}) // someone else's
			_ = fr.WritePing(false, data)      // not an ACK
			_ = fr.WritePing(true, data)       // ours
		})
		ackAt := len(in) - 1
		if feedIn(tr, in[:ackAt], bytewise) || tr.Acked() {
			t.Fatal("acknowledged before the last byte of the ACK")
		}
		if !feedIn(tr, in[ackAt:], bytewise) || !tr.Acked() {
			t.Fatal("ACK not seen")
		}
	}
}

// Once the client acknowledged the PING, the final GOAWAY carries the
// highest stream it opened before, and the frames of streams it opens
// after are withheld from the server (which must not process what the
// GOAWAY says was not), whatever the split; the rest passes unchanged.
func TestFinalGoAwayWithholdsLaterStreams(t *testing.T) {
	data := [8]byte{'t', 'c'}
	before := clientFrames(func(fr *http2.Framer) {
		_ = fr.WriteSettings()
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("a"), EndHeaders: true, EndStream: true})
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("b"), EndHeaders: true})
	})
	var after, kept bytes.Buffer
	fr, fk := http2.NewFramer(&after, nil), http2.NewFramer(&kept, nil)
	_ = fr.WritePing(true, data)
	_ = fk.WritePing(true, data)
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, BlockFragment: []byte("c")})
	_ = fr.WriteContinuation(5, true, []byte("d"))
	_ = fr.WriteWindowUpdate(0, 100)
	_ = fk.WriteWindowUpdate(0, 100)
	_ = fr.WriteData(5, true, []byte("never"))
	_ = fr.WriteData(3, true, []byte("body"))
	_ = fk.WriteData(3, true, []byte("body"))
	_ = fr.WriteRSTStream(7, http2.ErrCodeCancel)
	for _, bytewise := range []bool{false, true} {
		tr := NewServer()
		passed, _ := feedInPassed(tr, before, bytewise)
		if !bytes.Equal(passed, before) || tr.FinalGoAway() != nil || tr.Refusing() {
			t.Fatalf("bytewise %v: before the PING, the bytes changed or a final GOAWAY was made", bytewise)
		}
		tr.DrainFrames(data)
		passed, acked := feedInPassed(tr, after.Bytes(), bytewise)
		if !acked || !tr.Refusing() {
			t.Fatalf("bytewise %v: the ACK not seen", bytewise)
		}
		if !bytes.Equal(passed, kept.Bytes()) {
			t.Fatalf("bytewise %v: the server reads %x\nwant %x", bytewise, passed, kept.Bytes())
		}
		g, err := http2.NewFramer(nil, bytes.NewReader(tr.FinalGoAway())).ReadFrame()
		if err != nil || g.(*http2.GoAwayFrame).LastStreamID != 3 || g.(*http2.GoAwayFrame).ErrCode != http2.ErrCodeNo {
			t.Fatalf("bytewise %v: final GOAWAY %v %v; want last stream 3, NO_ERROR", bytewise, g, err)
		}
		if tr.OpenStreams() != 2 || tr.LastPeerStream() != 3 {
			t.Fatalf("bytewise %v: %d open streams, last %d; want 2 (1 and 3, their responses to come), last 3", bytewise, tr.OpenStreams(), tr.LastPeerStream())
		}
	}
}

func TestNotHTTP2(t *testing.T) {
	tr := NewServer()
	inPass(tr, []byte("PRI * HTTP/2.0\r\n"))
	if tr.Failed() {
		t.Fatal("failed on a preface's beginning")
	}
	inPass(tr, []byte("GET / HTTP/1.1\r\n\r\n"))
	if !tr.Failed() {
		t.Fatal("took an HTTP/1.1 request for HTTP/2")
	}
}

// FuzzTracker feeds arbitrary bytes both ways, split at arbitrary points:
// nothing panics, the state after the bytes does not depend on how they
// were split, and, fed a byte at a time, no stream closes inside a frame
// or a header block of the direction that closes it (where the close it
// allows would cut the block).
func FuzzTracker(f *testing.F) {
	headerBlocks := func(fr *http2.Framer) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("abc"), EndStream: true})
		_ = fr.WriteContinuation(1, false, []byte("de"))
		_ = fr.WriteContinuation(1, true, []byte("f"))
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("x"), EndHeaders: true})
		_ = fr.WriteData(3, false, []byte("body"))
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte("trailers"), EndStream: true})
		_ = fr.WriteContinuation(3, true, []byte("more"))
	}
	var srv bytes.Buffer
	headerBlocks(http2.NewFramer(&srv, nil))
	f.Add(clientFrames(headerBlocks), srv.Bytes(), uint8(2))
	f.Add(clientFrames(func(fr *http2.Framer) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: true, EndStream: true})
	}), srv.Bytes(), uint8(4))

	f.Add([]byte(ClientPreface+"\x00\x00\x00\x04\x00\x00\x00\x00\x00"), []byte("\x00\x00\x00\x04\x00\x00\x00\x00\x00"), uint8(3))
	f.Add(clientFrames(func(fr *http2.Framer) {
		_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("x"), EndHeaders: false})
		_ = fr.WriteContinuation(1, true, []byte("y"))
		_ = fr.WritePing(true, [8]byte{})
	}), []byte("\x00\x00\x01\x01\x00\x00\x00\x00\x01x\x00\x00\x00\x00\x01\x00\x00\x00\x01"), uint8(1))
	f.Fuzz(func(t *testing.T, in, out []byte, step uint8) {
		s := int(step)%17 + 1
		whole, split := NewServer(), NewServer()
		whole.DrainFrames([8]byte{})
		split.DrainFrames([8]byte{})
		wholePassed, _ := inPass(whole, in)
		whole.Out(out)
		var splitPassed []byte
		for i := 0; i < len(in); i += s {
			p, _ := inPass(split, in[i:min(len(in), i+s)])
			splitPassed = append(splitPassed, p...)
		}
		if !bytes.Equal(wholePassed, splitPassed) {
			t.Fatalf("split by %d: the server reads %d bytes, %d from the whole", s, len(splitPassed), len(wholePassed))
		}
		if !whole.Failed() && len(wholePassed) >= len(ClientPreface) {
			// What the server reads is whole frames, and after the ACK
			// none of a stream above the final GOAWAY's last id.
			last := uint32(MaxStreamID)
			if g := whole.FinalGoAway(); g != nil {
				last = binary.BigEndian.Uint32(g[HeaderLen:]) & MaxStreamID
			}
			acked := false
			for p := wholePassed[len(ClientPreface):]; len(p) >= HeaderLen; {
				h := ParseHeader(p)
				if acked && h.StreamID > last {
					t.Fatalf("the server reads a frame (type %d) of stream %d after the ACK; the final GOAWAY's last id is %d", h.Type, h.StreamID, last)
				}
				if h.Type == TypePing && h.Flags&FlagAck != 0 && int(h.Length) >= 8 && len(p) >= HeaderLen+int(h.Length) && [8]byte(p[HeaderLen:HeaderLen+8]) == [8]byte{} {
					acked = true
				}
				p = p[min(len(p), HeaderLen+int(h.Length)):]
			}
			if whole.Acked() != acked {
				t.Fatalf("acked %v, but the server reads the ACK: %v", whole.Acked(), acked)
			}
		}
		for i := 0; i < len(out); {
			chunk := out[i:min(len(out), i+s)]
			n, _ := split.ToBoundary(chunk)
			split.Out(chunk[n:])
			i += len(chunk)
		}
		if whole.Failed() != split.Failed() || whole.Acked() != split.Acked() || whole.OpenStreams() != split.OpenStreams() ||
			whole.AtBoundary() != split.AtBoundary() || whole.LastPeerStream() != split.LastPeerStream() {
			t.Fatalf("split by %d: state differs from the whole", s)
		}

		// Byte by byte, interleaving the two directions by step: a
		// stream closes only at a frame's end outside a header block of
		// the direction whose byte closed it.
		bytewise := NewServer()
		bytewise.DrainFrames([8]byte{})
		i, o := 0, 0
		for i < len(in) || o < len(out) {
			for k := 0; k < s && i < len(in); k++ {
				open := bytewise.OpenStreams()
				inPass(bytewise, in[i:i+1])
				i++
				if bytewise.OpenStreams() < open && !bytewise.in.atBoundary() {
					t.Fatalf("a stream closed at the client's byte %d, inside a frame or header block", i-1)
				}
			}
			for k := 0; k < s && o < len(out); k++ {
				open := bytewise.OpenStreams()
				idle := bytewise.Out(out[o : o+1])
				o++
				if (bytewise.OpenStreams() < open || idle) && !bytewise.AtBoundary() {
					t.Fatalf("a stream closed at the server's byte %d, inside a frame or header block", o-1)
				}
			}
		}
	})
}

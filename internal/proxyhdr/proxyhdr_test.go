package proxyhdr

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
)

// v2Header returns a version 2 header (PROXY, TCP over IPv4) with n bytes
// of addresses and TLVs.
func v2Header(n int) []byte {
	h := append([]byte(v2Sig), 0x21, 0x11, 0, 0)
	binary.BigEndian.PutUint16(h[14:], uint16(n))
	return append(h, bytes.Repeat([]byte{7}, n)...)
}

const (
	preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
	v1      = "PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
)

// feed runs stream through a Skipper in pieces of step bytes (with an
// empty read between each) and returns what came after the header.
func feed(stream []byte, step int) (after []byte, s *Skipper) {
	s = &Skipper{}
	var out []byte
	for i := 0; i < len(stream); i += step {
		if a, ok := s.Skip(nil); ok {
			out = append(out, a...)
		}
		a, ok := s.Skip(stream[i:min(len(stream), i+step)])
		if !ok && len(a) > 0 {
			panic("bytes returned before the header's end")
		}
		out = append(out, a...)
	}
	return out, s
}

func TestSkip(t *testing.T) {
	long := v1[:len(v1)-2] + strings.Repeat("x", V1MaxLen)
	for _, tc := range []struct {
		name      string
		stream    []byte
		after     string
		hdr       int
		malformed bool
	}{
		{"no header, HTTP/2", []byte(preface), preface, 0, false},
		{"no header, HTTP/1.1", []byte("GET / HTTP/1.1\r\n"), "GET / HTTP/1.1\r\n", 0, false},
		{"no header, PROXY's first letters", []byte("PROXZ"), "PROXZ", 0, false},
		{"no header, POST", []byte("POST / HTTP/1.1\r\n"), "POST / HTTP/1.1\r\n", 0, false},
		{"no header, CRLFs", []byte("\r\n\r\nX"), "\r\n\r\nX", 0, false},
		{"no header, signature but its last byte", []byte(v2Sig[:11] + "X" + preface), v2Sig[:11] + "X" + preface, 0, false},
		{"v1 then HTTP/2", []byte(v1 + preface), preface, len(v1), false},
		{"v1 alone", []byte(v1), "", len(v1), false},
		{"v1 UNKNOWN", []byte("PROXY UNKNOWN\r\nGET /"), "GET /", len("PROXY UNKNOWN\r\n"), false},
		{"v1 of the longest length", []byte("PROXY " + strings.Repeat("a", V1MaxLen-8) + "\r\nGET"), "GET", V1MaxLen, false},
		{"v1 one byte too long", []byte("PROXY " + strings.Repeat("a", V1MaxLen-7) + "\r\nGET"), "\nGET", V1MaxLen, true},
		{"v1 without its end", []byte(long), long[V1MaxLen:], V1MaxLen, true},
		{"v2 then HTTP/2", append(v2Header(12), preface...), preface, 28, false},
		{"v2 LOCAL, no addresses", append(v2Header(0), "GET"...), "GET", 16, false},
		{"v2 of the longest length", append(v2Header(65535), "x"...), "x", 16 + 65535, false},
		{"v2 fixed part alone", v2Header(0), "", 16, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, step := range []int{1, 2, 5, 11, 12, 13, 16, 17, len(tc.stream)} {
				after, s := feed(tc.stream, step)
				if string(after) != tc.after || s.Len() != tc.hdr || s.Malformed() != tc.malformed {
					t.Fatalf("in pieces of %d: after %q, header %d, malformed %v; want %q, %d, %v",
						step, after, s.Len(), s.Malformed(), tc.after, tc.hdr, tc.malformed)
				}
				if _, ok := s.Skip(nil); !ok {
					t.Fatalf("in pieces of %d: not done after the whole stream", step)
				}
			}
		})
	}
}

// A header not yet whole holds everything back, and is not done.
func TestSkipPartial(t *testing.T) {
	for _, part := range []string{"P", "PROXY", v1[:20], v2Sig[:3], v2Sig, string(v2Header(5)[:18])} {
		var s Skipper
		if after, ok := s.Skip([]byte(part)); ok || len(after) > 0 {
			t.Errorf("%q: after %q, done %v; want nothing, not done", part, after, ok)
		}
	}
}

// The common case, no header: the bytes are returned as they are, with no
// copy.
func TestSkipNoHeaderAliases(t *testing.T) {
	for _, p := range [][]byte{[]byte(preface), []byte("GET / HTTP/1.1\r\n")} {
		var s Skipper
		after, ok := s.Skip(p)
		if !ok || len(after) != len(p) || &after[0] != &p[0] {
			t.Errorf("%q: not p itself", p)
		}
	}
}

func BenchmarkSkipNoHeader(b *testing.B) {
	p := []byte(preface)
	b.ReportAllocs()
	for b.Loop() {
		var s Skipper
		s.Skip(p)
	}
}

// FuzzSkip feeds arbitrary streams in arbitrary pieces: nothing panics,
// the result does not depend on the pieces, and it agrees with a plain
// reading of the two headers' formats.
func FuzzSkip(f *testing.F) {
	f.Add([]byte(v1+preface), uint8(3))
	f.Add(append(v2Header(12), preface...), uint8(1))
	f.Add([]byte("PROXZ"), uint8(2))
	f.Add([]byte(preface), uint8(0))
	f.Fuzz(func(t *testing.T, stream []byte, step uint8) {
		whole, ws := feed(stream, max(1, len(stream)))
		split, ss := feed(stream, int(step)%19+1)
		if !bytes.Equal(whole, split) || ws.Len() != ss.Len() || ws.Malformed() != ss.Malformed() {
			t.Fatalf("in pieces of %d: %q (%d), whole: %q (%d)", int(step)%19+1, split, ss.Len(), whole, ws.Len())
		}
		hdr := reference(stream)
		if hdr > len(stream) {
			if _, ok := ws.Skip(nil); ok {
				t.Fatalf("done before the header's %d bytes (of %d)", hdr, len(stream))
			}
			return
		}
		if ws.Len() != hdr || !bytes.Equal(whole, stream[hdr:]) {
			t.Fatalf("header %d bytes, after %q; want %d, %q", ws.Len(), whole, hdr, stream[hdr:])
		}
	})
}

// reference returns the length of the header at the start of b as the
// formats define it: 0 for none, more than len(b) for one that b does not
// hold whole (or may still be one).
func reference(b []byte) int {
	switch {
	case bytes.HasPrefix(b, []byte(v1Prefix)):
		if i := bytes.IndexByte(b[:min(len(b), V1MaxLen)], '\n'); i >= 0 {
			return i + 1
		}
		if len(b) >= V1MaxLen {
			return V1MaxLen // malformed: given up on there
		}
		return len(b) + 1
	case bytes.HasPrefix(b, []byte(v2Sig)):
		if len(b) < V2FixedLen {
			return len(b) + 1
		}
		return V2FixedLen + int(binary.BigEndian.Uint16(b[14:]))
	case len(b) > 0 && (strings.HasPrefix(v1Prefix, string(b)) || strings.HasPrefix(v2Sig, string(b))):
		return len(b) + 1 // a prefix of a header's start: undecided
	}
	return 0
}

// Package proxyhdr finds where the PROXY protocol's header (HAProxy's
// proxy-protocol.txt, versions 1 and 2) ends at the start of a stream, for
// a reader that sees the bytes before the PROXY protocol's own reader does
// and needs what follows the header: tcpops' listener wrapper placed before
// Caddy's proxy_protocol wrapper, which tells HTTP/2 from HTTP/1.1 by the
// client's first bytes and follows its HTTP/2 frames.
//
// It skips, it does not parse: addresses, TLVs and checksums are the PROXY
// protocol reader's business, and a malformed header is its to refuse.
package proxyhdr

import (
	"bytes"
	"encoding/binary"
)

// The two headers' fixed starts. Version 1 is one line of text, "PROXY "
// to CRLF, of at most V1MaxLen bytes; version 2 is binary: the 12-byte
// signature, a version/command byte, a family byte and the big-endian
// length of what follows (addresses and TLVs), V2FixedLen bytes in all.
const (
	v1Prefix   = "PROXY "
	v2Sig      = "\r\n\r\n\x00\r\nQUIT\n"
	V1MaxLen   = 107
	V2FixedLen = 16
)

type state uint8

const (
	undecided state = iota // too few bytes yet to tell a header from none
	inV1                   // inside a version 1 line, up to its LF
	inV2                   // inside a version 2 header
	done                   // past the header, or there was none
)

// Skipper follows the first bytes of one stream, fed in order as they are
// read, however they are split. Its zero value is ready to use. It is not
// safe for concurrent use (a stream has one reader at a time).
type Skipper struct {
	state state
	bad   bool // a version 1 line longer than V1MaxLen: not a header
	// head holds the first bytes while undecided, then a version 2
	// header's fixed part until its length is known.
	head [V2FixedLen]byte
	nh   int
	left int // inV1: bytes the line may still take; inV2: bytes still to skip
	hdr  int // bytes of header skipped so far
}

// Skip takes the next bytes of the stream, p, and returns the bytes after
// the header, and whether the header (if there is one) is behind. While it
// is not, after is empty; once it is, every later call returns p as it is.
//
// after aliases p, but on a stream without a header whose first bytes came
// in pieces shorter than the headers' starts (6 or 12 bytes): it is then a
// new slice of the bytes held back from earlier calls, followed by p.
func (s *Skipper) Skip(p []byte) (after []byte, ok bool) {
	if s.state == done {
		return p, true
	}
	if s.state == undecided {
		if len(p) == 0 {
			return nil, false
		}
		if s.nh == 0 && p[0] != v1Prefix[0] && p[0] != v2Sig[0] {
			s.state = done // the common case, decided by the first byte
			return p, true
		}
		held := s.nh // bytes held back from earlier calls
		first := p[0]
		if held > 0 {
			first = s.head[0]
		}
		want := v2Sig // the two starts differ in their first byte
		if first == v1Prefix[0] {
			want = v1Prefix
		}
		k := 0
		for ; s.state == undecided && k < len(p); k++ {
			if p[k] != want[s.nh] {
				s.state = done // neither header: what was held back is the stream
				if held == 0 {
					return p, true
				}
				return append(append(make([]byte, 0, held+len(p)), s.head[:held]...), p...), true
			}
			s.head[s.nh] = p[k]
			s.nh++
			if s.nh == len(want) {
				s.state, s.hdr = inV2, s.nh
				if want == v1Prefix {
					s.state, s.left = inV1, V1MaxLen-s.nh
				}
			}
		}
		if s.state == undecided {
			return nil, false
		}
		p = p[k:]
	}
	if s.state == inV1 {
		if i := bytes.IndexByte(p[:min(len(p), s.left)], '\n'); i >= 0 {
			s.hdr += i + 1
			s.state = done
			return p[i+1:], true
		}
		k := min(len(p), s.left)
		s.hdr += k
		s.left -= k
		if s.left > 0 {
			return nil, false
		}
		s.state, s.bad = done, true
		return p[k:], true
	}
	// inV2
	if s.nh < V2FixedLen {
		k := copy(s.head[s.nh:], p)
		s.nh += k
		s.hdr += k
		p = p[k:]
		if s.nh < V2FixedLen {
			return nil, false
		}
		s.left = int(binary.BigEndian.Uint16(s.head[14:]))
	}
	k := min(len(p), s.left)
	s.left -= k
	s.hdr += k
	if s.left > 0 {
		return nil, false
	}
	s.state = done
	return p[k:], true
}

// Len returns how many bytes of header were skipped so far: 0 on a stream
// without one.
func (s *Skipper) Len() int { return s.hdr }

// Malformed reports whether the stream started as a version 1 header whose
// line ran past V1MaxLen bytes without its end. What follows is then not
// known to be anything (Caddy's proxy_protocol refuses the connection).
func (s *Skipper) Malformed() bool { return s.bad }

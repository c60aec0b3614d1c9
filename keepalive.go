package tcpops

import (
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// unwrapConn walks the wrappers caddy-l4 and Caddy put around a connection
// (layer4.Connection, tls.Conn, the PROXY protocol's Conn, an earlier tcpops)
// down to the socket. It returns the tcpops Conn it met on the way, if any,
// the *net.TCPConn at the bottom, if any, and otherwise the type it could not
// see through, for the log.
func unwrapConn(c net.Conn) (tracked *Conn, tcp *net.TCPConn, opaque net.Conn) {
	for i := 0; i < 32 && c != nil; i++ { // bounded: a wrapper cycle must not hang a connection
		switch v := c.(type) {
		case *net.TCPConn:
			return tracked, v, nil
		case *Conn:
			if tracked == nil {
				tracked = v
			}
		}
		next := wrapped(c)
		if next == nil {
			return tracked, nil, c
		}
		c = next
	}
	return tracked, nil, c
}

// wrapped returns the connection c wraps, or nil when c is a socket or a
// wrapper tcpops cannot see through.
func wrapped(c net.Conn) net.Conn {
	switch v := c.(type) {
	case *Conn:
		return v.Conn
	case *layer4.Connection:
		return v.Conn
	case *tls.Conn:
		return v.NetConn()
	case interface{ Raw() net.Conn }: // github.com/pires/go-proxyproto.Conn
		return v.Raw()
	case interface{ NetConn() net.Conn }:
		return v.NetConn()
	}
	return nil
}

// addrMayBlock reports whether asking c for its addresses may wait for the
// peer: go-proxyproto's Conn (Caddy's proxy_protocol listener wrapper)
// reads the PROXY header on the first RemoteAddr, LocalAddr or Read, so a
// listener that asked in Accept would stall every other connection behind
// one that has not sent its header yet.
func addrMayBlock(c net.Conn) bool {
	for i := 0; i < 32 && c != nil; i++ {
		if _, ok := c.(interface{ Raw() net.Conn }); ok {
			return true
		}
		c = wrapped(c)
	}
	return false
}

// sockoptError is one socket option that could not be set.
type sockoptError struct {
	Option string // e.g. "TCP_KEEPIDLE"
	Value  int
	Err    error
}

func (e sockoptError) Error() string {
	return fmt.Sprintf("tcpops: setsockopt %s=%d: %v", e.Option, e.Value, e.Err)
}

func (e sockoptError) Unwrap() error { return e.Err }

// applySocketOptions sets o's keepalive and user timeout on tc. It sets every
// option it can and returns one error per option that failed; nil when all
// succeeded, so the common path does not allocate.
func applySocketOptions(tc *net.TCPConn, o *Options) []sockoptError {
	if o.Keepalive == nil && !o.UserTimeout.IsSet() {
		return nil
	}
	var s socketSettings
	s.keepalive = -1
	if ka := o.Keepalive; ka != nil {
		s.keepalive = 1
		if ka.Off {
			s.keepalive = 0
		}
		s.idle = int(time.Duration(ka.Idle) / time.Second)
		s.interval = int(time.Duration(ka.Interval) / time.Second)
		s.count = ka.Count
	}
	s.userTimeout = -1
	if o.UserTimeout.IsSet() {
		s.userTimeout = int(o.UserTimeout.Duration() / time.Millisecond)
	}
	return setSocketOptions(tc, &s)
}

// socketSettings are the raw values to set; -1 (keepalive, userTimeout) or 0
// (idle, interval, count) leaves an option as it is.
type socketSettings struct {
	keepalive      int // 1 on, 0 off, -1 unchanged
	idle, interval int // seconds
	count          int
	userTimeout    int // milliseconds; 0 is the kernel default
}

// SocketState is what the kernel says about a connection's socket. Fields the
// platform cannot report are nil.
type SocketState struct {
	Keepalive         *bool    `json:"keepalive,omitempty"`
	KeepaliveIdle     *int     `json:"keepalive_idle_seconds,omitempty"`
	KeepaliveCount    *int     `json:"keepalive_count,omitempty"`
	KeepaliveInterval *int     `json:"keepalive_interval_seconds,omitempty"`
	UserTimeoutMillis *int     `json:"user_timeout_ms,omitempty"`
	TCPInfo           *TCPInfo `json:"tcp_info,omitempty"`
}

// TCPInfo is the part of the kernel's TCP_INFO an operator asks for when a
// connection misbehaves (Linux only).
type TCPInfo struct {
	State          string `json:"state"`
	RTTMicros      uint32 `json:"rtt_us"`
	RTTVarMicros   uint32 `json:"rttvar_us"`
	Retransmits    uint8  `json:"retransmits"`
	TotalRetrans   uint32 `json:"total_retrans"`
	Probes         uint8  `json:"probes"`
	Unacked        uint32 `json:"unacked"`
	LastDataRecvMs uint32 `json:"last_data_recv_ms"`
	LastDataSentMs uint32 `json:"last_data_sent_ms"`

	// For telling a zero window cut by TCP_USER_TIMEOUT (Conn.timeoutClassLocked):
	notsentBytes uint32 // bytes written but not yet sent (tcpi_notsent_bytes)
}

// sendQueueState is what sendQueue reads of a socket's send queue, for a
// graceful close's linger and the HTTP/2 PING's timeout (httpstate.go,
// h2close.go).
type sendQueueState struct {
	outq   int    // bytes not yet acknowledged, sent or not (SIOCOUTQ)
	acked  uint64 // bytes the peer acknowledged since the connection opened (tcpi_bytes_acked)
	closed bool   // the kernel closed the connection (TCP state CLOSE)
}

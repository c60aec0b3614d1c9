package tcpops

import (
	"fmt"
	"time"
)

// Graceful max_lifetime: how an HTTP connection that reached its
// max_lifetime drains instead of being cut.
//
// Operators cap the age of HTTP connections so that long-lived ones (HTTP/2
// above all) rebalance onto new backends. Cut at that age, a connection
// takes its requests in flight with it: an h2c client gets "unexpected
// EOF", and Go's HTTP/1.1 client sends a GET again on a new connection but
// loses a POST. So, as gRPC-Go's MaxConnectionAge and Envoy's
// max_connection_duration do, a connection an HTTP server serves through
// the listener wrapper (httpstate.go) drains when it reaches max_lifetime:
//
//   - with nothing in flight it closes at once;
//   - with requests in flight it lets them finish, and closes at the first
//     moment none is (the server's StateIdle);
//   - it closes hard at max_lifetime + max_lifetime_grace at the latest
//     (default 30s, gRPC-Go's MaxConnectionAgeGrace; "off" waits however
//     long), with cause max_lifetime_grace; a graceful end's cause is
//     max_lifetime, as on any connection.
//
// A connection hijacked from the server (a WebSocket) has its upgraded
// request in flight until it ends: it is cut at max_lifetime + grace.
//
// Where tcpops sees HTTP/2's frames (h2c, or after tls) it tells the client
// itself, with a GOAWAY at max_lifetime (h2close.go). Elsewhere, what a
// listener wrapper cannot do is tell the client: Go's server sends
// Connection: close (HTTP/1.1) or GOAWAY (HTTP/2) only when a response
// header says Connection: close, and a listener wrapper sees bytes, not
// headers. So a client that keeps an HTTP/2 connection busy with
// overlapping streams never leaves it idle, and is cut at the grace; and an
// HTTP/1.1 client may send its next request on the connection in the
// moment it closes (the race every idle close has). The tcpops_drain HTTP
// handler (drainhandler.go) adds the header.

// CauseMaxLifetimeGrace is the cause of an HTTP connection closed hard
// because requests were still in flight max_lifetime_grace after its
// max_lifetime.
const CauseMaxLifetimeGrace = "max_lifetime_grace"

// defaultMaxLifetimeGrace is max_lifetime_grace when not set: long enough
// for ordinary requests and short enough that max_lifetime still
// rebalances, as Envoy's drain_timeout (5s) and gRPC-Go's infinite
// default are not.
const defaultMaxLifetimeGrace = 30 * time.Second

// endMaxLifetime is the end of an HTTP connection that closed while it
// drained: the client or the server closed it before tcpops did (after
// Connection: close or GOAWAY from tcpops_drain, for one).
var endMaxLifetime = &endClass{ReasonTimeout, CauseMaxLifetime}

// graceLocked returns how long requests in flight may run past max_lifetime;
// 0 for no limit. c.mu must be held.
func (c *Conn) graceLocked() time.Duration {
	switch g := c.opts.MaxLifetimeGrace; {
	case g.IsOff():
		return 0
	case g.IsSet():
		return g.Duration()
	}
	return defaultMaxLifetimeGrace
}

// drainEnd returns endMaxLifetime when c is an HTTP connection past its
// max_lifetime, whose ordinary end (a close by the server or the client) is
// its drain's; nil otherwise.
func (c *Conn) drainEnd() *endClass {
	if c.http == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cause := c.http.goawayCause; cause != "" {
		return endClassOf(ReasonTimeout, cause) // closed after tcpops' GOAWAY (h2close.go)
	}
	if c.draining(c.since()) {
		return endMaxLifetime
	}
	return nil
}

// draining reports whether c is an HTTP connection past its max_lifetime.
// c.mu must be held.
func (c *Conn) draining(now time.Duration) bool {
	return c.httpPhaseLocked() != httpUnseen && c.maxLifetime > 0 && now >= c.maxLifetime
}

// checkGraceLocked refuses, for the admin API, a max_lifetime_grace on a
// connection no HTTP server serves (it would promise a drain that never
// happens), and one that would cut a draining connection at once;
// maxLifetime is the connection's max_lifetime after the change. c.mu must
// be held.
func (c *Conn) checkGraceLocked(o *Options, now, maxLifetime time.Duration) error {
	g := o.MaxLifetimeGrace
	if !g.IsSet() {
		return nil
	}
	if c.httpPhaseLocked() == httpUnseen {
		return errChangeConflict{fmt.Sprintf("tcpops: max_lifetime_grace %v: connection %d is not served by an HTTP server through "+
			"the listener wrapper, so it has no requests to wait for and max_lifetime closes it when it is reached; nothing was changed", g, c.id)}
	}
	if g.IsOff() || maxLifetime <= 0 || now < maxLifetime {
		return nil
	}
	if end := addSat(maxLifetime, g.Duration()); end <= now {
		return errChangeConflict{fmt.Sprintf("tcpops: max_lifetime_grace %v: connection %d has been draining since its max_lifetime %v, "+
			"%v ago, so it would be cut at once; nothing was changed (to close it now, DELETE it)",
			g, c.id, maxLifetime, (now - maxLifetime).Round(time.Millisecond))}
	}
	return nil
}

package tcpops

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&DrainHandler{})
	httpcaddyfile.RegisterHandlerDirective("tcpops_drain", parseDrainHandler)
	// First among the handlers that write responses, so that it sees every
	// response of the site, whatever handler writes it; no user needs an
	// order line.
	httpcaddyfile.RegisterDirectiveOrder("tcpops_drain", httpcaddyfile.After, "tracing")
}

// DrainHandler is the HTTP handler http.handlers.tcpops_drain, the
// companion of the listener wrapper's graceful max_lifetime (drain.go). On
// a connection the listener wrapper tracks that has reached its
// max_lifetime, it adds Connection: close to each response: Go's HTTP/1.1
// server then closes the connection after that response and tells the
// client so, and its HTTP/2 server sends GOAWAY (h2_bundle.go, writeChunk)
// so that the client opens its next streams on a new connection while
// those in flight finish.
//
// The listener wrapper alone lets requests in flight finish and closes the
// connection at the first moment none is, but cannot tell the client, whose
// headers it never sees. It is enough for most traffic. This handler is
// needed where that moment may never come, or comes as a surprise:
//
//   - HTTP/2 (gRPC above all) with streams that overlap without pause: the
//     connection is never idle, and is cut when max_lifetime_grace runs out,
//     with the streams in flight then;
//   - HTTP/1.1 clients that send non-idempotent requests back to back: one
//     sent in the moment the connection closes is lost, as on any idle
//     close (Go's client sends a GET again, not a POST).
//
// It does nothing on connections the listener wrapper does not track, or
// that have no max_lifetime.
type DrainHandler struct {
	server *caddyhttp.Server // the server it registered with, for Cleanup
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*DrainHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.tcpops_drain",
		New: func() caddy.Module { return new(DrainHandler) },
	}
}

// drainServers holds the HTTP servers a DrainHandler registered with, so
// that a server with the directive in many routes registers once.
var drainServers sync.Map // *caddyhttp.Server -> struct{}

// Provision registers, once per HTTP server, a connection context function
// that finds the tracked connection under each new connection: a handler
// sees a request, not its connection, and Caddy's own ConnCtxKey is no
// longer set ("implement a middleware plugin that RegisterConnContext during
// provisioning", caddyhttp/server.go). While the HTTP app provisions a
// server's routes, the context carries the server (caddyhttp.ServerCtxKey).
func (h *DrainHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger(h)
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv == nil {
		h.logger.Warn("tcpops_drain: not provisioned by an HTTP server; it does nothing")
		return nil
	}
	if _, loaded := drainServers.LoadOrStore(srv, struct{}{}); !loaded {
		h.server = srv
		srv.RegisterConnContext(drainConnContext)
	}
	return nil
}

// Cleanup forgets the server it registered with, when its configuration is
// unloaded.
func (h *DrainHandler) Cleanup() error {
	if h.server != nil {
		drainServers.Delete(h.server)
	}
	return nil
}

// drainConnKey is the connection context key of the tracked connection.
type drainConnKey struct{}

// drainConnContext puts the Conn of an HTTP connection the listener wrapper
// tracks into the connection's context, which every request on it
// inherits. It runs once per connection, before the first request.
func drainConnContext(ctx context.Context, nc net.Conn) context.Context {
	if c, _, _ := httpConnOf(nc); c != nil {
		return context.WithValue(ctx, drainConnKey{}, c)
	}
	return ctx
}

// ServeHTTP marks the response of a connection past its max_lifetime with
// Connection: close, when its header is written.
func (h *DrainHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	c, ok := r.Context().Value(drainConnKey{}).(*Conn)
	if !ok || !c.hasMaxLifetime() {
		return next.ServeHTTP(w, r)
	}
	dw := &drainWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, c: c}
	err := next.ServeHTTP(dw, r)
	if err != nil && !dw.decided && c.pastMaxLifetime() {
		// Caddy writes the error response (its own, or a handle_errors
		// route's) through w, not through dw (caddyhttp/server.go,
		// ServeHTTP after serveHTTP returns), with w's header map: the
		// header set here goes out with it.
		w.Header().Set("Connection", "close")
	}
	return err
}

// hasMaxLifetime reports whether c has a max_lifetime at all.
func (c *Conn) hasMaxLifetime() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.maxLifetime > 0
}

// pastMaxLifetime reports whether c has reached its max_lifetime.
func (c *Conn) pastMaxLifetime() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.maxLifetime > 0 && c.since() >= c.maxLifetime
}

// drainWriter decides, when the response header is written, whether the
// response closes the connection: a request that started before
// max_lifetime and answers after it closes the connection too. Every way a
// header can go out passes through decide: WriteHeader, the implicit 200 of
// Write, ReadFrom and Flush (which Caddy's reverse_proxy uses to stream).
type drainWriter struct {
	*caddyhttp.ResponseWriterWrapper
	c       *Conn
	decided bool
}

func (w *drainWriter) decide(status int) {
	if w.decided || status < http.StatusOK { // 1xx: the final header is still to come
		return
	}
	w.decided = true
	if w.c.pastMaxLifetime() {
		w.Header().Set("Connection", "close")
	}
}

// WriteHeader writes the header, with Connection: close once past
// max_lifetime.
func (w *drainWriter) WriteHeader(status int) {
	w.decide(status)
	w.ResponseWriter.WriteHeader(status)
}

// Write writes the body, and first the header if not written yet.
func (w *drainWriter) Write(p []byte) (int, error) {
	w.decide(http.StatusOK)
	return w.ResponseWriter.Write(p)
}

// ReadFrom copies the body from r, and first the header if not written yet.
func (w *drainWriter) ReadFrom(r io.Reader) (int64, error) {
	w.decide(http.StatusOK)
	return w.ResponseWriterWrapper.ReadFrom(r)
}

// FlushError flushes, and first writes the header if not written yet;
// http.ResponseController finds it before it unwraps.
func (w *drainWriter) FlushError() error {
	w.decide(http.StatusOK)
	return http.NewResponseController(w.ResponseWriter).Flush()
}

// parseDrainHandler sets up the handler from the Caddyfile: the directive
// takes no arguments and no block.
//
//	tcpops_drain
func parseDrainHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	dh := new(DrainHandler)
	return dh, dh.UnmarshalCaddyfile(h.Dispenser)
}

// UnmarshalCaddyfile checks that tcpops_drain has no arguments or block.
func (*DrainHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("tcpops_drain: takes no arguments; got %q (the max_lifetime it acts on is the listener wrapper's)", d.Val())
	}
	if d.NextBlock(0) {
		return d.Errf("tcpops_drain: takes no block")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*DrainHandler)(nil)
	_ caddy.CleanerUpper          = (*DrainHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*DrainHandler)(nil)
	_ caddyfile.Unmarshaler       = (*DrainHandler)(nil)
)

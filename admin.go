package tcpops

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&adminAPI{})
}

// adminAPI is the admin.api.tcpops module: Kamailio's conid functions and
// HAProxy's "show sess" / "shutdown session" for the connections tcpops
// tracks, on Caddy's admin endpoint.
//
//	GET    /tcpops/connections          list (filters: remote, local; limit, after)
//	GET    /tcpops/connections/{id}     one connection
//	PATCH  /tcpops/connections/{id}     apply Options to it, as a later tcpops would
//	DELETE /tcpops/connections/{id}     close it now
//
// It is compiled in with the plugin: Caddy loads every admin.api module
// when it starts its admin endpoint.
type adminAPI struct {
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.tcpops",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision sets up the module's logger, which records every change an
// operator makes to a connection.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger(a)
	return nil
}

// Routes returns the routes of the /tcpops/connections endpoints.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: adminConnectionsPath, Handler: caddy.AdminHandlerFunc(a.handleConnections)},
		{Pattern: adminConnectionsPath + "/", Handler: caddy.AdminHandlerFunc(a.handleConnections)},
	}
}

const (
	adminConnectionsPath = "/tcpops/connections"

	// defaultListLimit and maxListLimit bound a listing: each entry costs a
	// handful of getsockopt calls and about 700 bytes of JSON, so a server
	// with 100k connections answers a bare GET quickly and a client pages
	// through the rest with ?after=.
	defaultListLimit = 1000
	maxListLimit     = 10000

	// maxPatchBody is far more than any Options object needs.
	maxPatchBody = 64 << 10
)

// handleConnections dispatches on the path: the collection or one id.
func (a *adminAPI) handleConnections(w http.ResponseWriter, r *http.Request) error {
	rest, _ := strings.CutPrefix(r.URL.Path, adminConnectionsPath)
	rest = strings.TrimPrefix(rest, "/")
	if rest == "" {
		if r.Method != http.MethodGet {
			return methodNotAllowed(w, r, http.MethodGet)
		}
		return a.handleList(w, r)
	}
	id, err := strconv.ParseUint(rest, 10, 64)
	if err != nil {
		return apiError(http.StatusBadRequest, "tcpops: invalid connection id %q: must be a decimal integer", rest)
	}
	switch r.Method {
	case http.MethodGet:
		c, err := lookup(id)
		if err != nil {
			return err
		}
		return writeJSON(w, http.StatusOK, connectionInfoOf(c))
	case http.MethodPatch:
		return a.handlePatch(w, r, id)
	case http.MethodDelete:
		return a.handleDelete(w, r, id)
	default:
		return methodNotAllowed(w, r, http.MethodGet, http.MethodPatch, http.MethodDelete)
	}
}

// handleList answers GET /tcpops/connections.
func (a *adminAPI) handleList(w http.ResponseWriter, r *http.Request) error {
	q, err := parseListQuery(r)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listConnections(connections, q))
}

// handlePatch answers PATCH /tcpops/connections/{id}: the body is Options in
// the handler's JSON form, merged over the settings in force exactly as a
// second tcpops on the connection would. Nothing is applied unless the whole
// body is valid.
func (a *adminAPI) handlePatch(w http.ResponseWriter, r *http.Request, id uint64) error {
	c, err := lookup(id)
	if err != nil {
		return err
	}
	if ct := r.Header.Get("Content-Type"); !strings.Contains(ct, "/json") {
		return apiError(http.StatusUnsupportedMediaType,
			"tcpops: unacceptable content-type %q; 'application/json' required", ct)
	}
	opts, err := decodeOptions(http.MaxBytesReader(w, r.Body, maxPatchBody))
	if err != nil {
		return err
	}
	if err := c.change(&opts, a.logger, true); err != nil {
		return changeError(id, err)
	}
	a.logger.Info("tcpops: connection updated through the admin API",
		c.logFields(zap.Any("options", opts), zap.String("requester", r.RemoteAddr))...)
	return writeJSON(w, http.StatusOK, connectionInfoOf(c))
}

// changeError turns an error of Conn.change into the API's answer: 404 for
// a connection that ended before the change, 409 for a max_lifetime it has
// already outlived.
func changeError(id uint64, err error) error {
	var passed errMaxLifetimePassed
	var conflict errChangeConflict
	switch {
	case errors.Is(err, errConnEnded):
		return apiError(http.StatusNotFound, "tcpops: connection %d ended", id)
	case errors.As(err, &passed), errors.As(err, &conflict):
		return caddy.APIError{HTTPStatus: http.StatusConflict, Err: err}
	}
	return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
}

// decodeOptions reads one Options object, rejecting unknown fields, trailing
// data and values out of range.
func decodeOptions(body io.Reader) (Options, error) {
	var opts Options
	raw, err := io.ReadAll(body)
	if err != nil {
		return opts, apiError(http.StatusBadRequest, "tcpops: reading request body: %v", err)
	}
	if len(bytes.TrimSpace(raw)) == 0 {
		return opts, apiError(http.StatusBadRequest, "tcpops: empty request body; want a JSON object of tcpops options")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&opts); err != nil {
		return opts, apiError(http.StatusBadRequest, "tcpops: decoding request body: %v", err)
	}
	// dec.More is false before a stray '}' or ']', so ask for the next
	// token: only the end of the body may follow the object.
	if _, err := dec.Token(); err != io.EOF {
		return opts, apiError(http.StatusBadRequest, "tcpops: decoding request body: unexpected data after the JSON object")
	}
	if err := opts.Validate(); err != nil {
		return opts, caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	return opts, nil
}

// handleDelete answers DELETE /tcpops/connections/{id}: Kamailio's
// tcp_close_connection. The end is recorded as closed by the operator.
func (a *adminAPI) handleDelete(w http.ResponseWriter, r *http.Request, id uint64) error {
	c, err := lookup(id)
	if err != nil {
		return err
	}
	c.closeWith(ReasonClosed, CauseAdmin)
	reason, cause := c.endedWith()
	if cause != CauseAdmin {
		return apiError(http.StatusNotFound, "tcpops: connection %d ended (%s, %s) before it could be closed", id, reason, cause)
	}
	a.logger.Info("tcpops: connection closed through the admin API",
		c.logFields(zap.String("requester", r.RemoteAddr))...)
	return writeJSON(w, http.StatusOK, closedInfo{ID: id, Reason: reason, Cause: cause})
}

// closedInfo is the answer to a DELETE.
type closedInfo struct {
	ID     uint64 `json:"id"`
	Reason string `json:"reason"`
	Cause  string `json:"cause"`
}

// lookup returns the live connection with the id or a 404 APIError.
func lookup(id uint64) (*Conn, error) {
	c := connections.get(id)
	if c == nil || c.isEnded() {
		return nil, apiError(http.StatusNotFound, "tcpops: connection %d not found", id)
	}
	return c, nil
}

// listQuery is a parsed GET /tcpops/connections query.
type listQuery struct {
	remote, local addrFilter
	limit         int
	after         uint64
}

// addrFilter matches an address by IP, or by IP and port when a port is
// given; the zero value matches everything.
type addrFilter struct {
	ip   netip.Addr
	port uint16 // 0: any
}

func (f addrFilter) match(a net.Addr) bool {
	if !f.ip.IsValid() {
		return true
	}
	ap, ok := addrPortOf(a)
	return ok && ap.Addr() == f.ip && (f.port == 0 || ap.Port() == f.port)
}

func parseAddrFilter(param, s string) (addrFilter, error) {
	if s == "" {
		return addrFilter{}, nil
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return addrFilter{ip: ap.Addr().Unmap(), port: ap.Port()}, nil
	}
	if ip, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		return addrFilter{ip: ip.Unmap()}, nil
	}
	return addrFilter{}, apiError(http.StatusBadRequest,
		"tcpops: %s %q: want an IP address or IP:port (for IPv6: [addr]:port)", param, s)
}

// addrPortOf returns a's IP (unmapped) and port.
func addrPortOf(a net.Addr) (netip.AddrPort, bool) {
	switch v := a.(type) {
	case nil:
		return netip.AddrPort{}, false
	case *net.TCPAddr:
		ap := v.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
	default:
		ap, err := netip.ParseAddrPort(a.String())
		if err != nil {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
	}
}

func parseListQuery(r *http.Request) (listQuery, error) {
	v := r.URL.Query()
	q := listQuery{limit: defaultListLimit}
	for name := range v {
		switch name {
		case "remote", "local", "limit", "after":
		default:
			return q, apiError(http.StatusBadRequest,
				"tcpops: unknown query parameter %q; allowed: remote, local, limit, after", name)
		}
	}
	var err error
	if q.remote, err = parseAddrFilter("remote", v.Get("remote")); err != nil {
		return q, err
	}
	if q.local, err = parseAddrFilter("local", v.Get("local")); err != nil {
		return q, err
	}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxListLimit {
			return q, apiError(http.StatusBadRequest,
				"tcpops: limit %q: must be an integer between 1 and %d", s, maxListLimit)
		}
		q.limit = n
	}
	if s := v.Get("after"); s != "" {
		if q.after, err = strconv.ParseUint(s, 10, 64); err != nil {
			return q, apiError(http.StatusBadRequest, "tcpops: after %q: must be a connection id", s)
		}
	}
	return q, nil
}

// connectionList is the answer to GET /tcpops/connections.
type connectionList struct {
	// Total is how many connections matched the filters, of which the
	// first Limit by id are listed.
	Total int `json:"total"`
	// NextAfter, set when the list was cut at the limit, is the value of
	// ?after= that returns the next page.
	NextAfter   uint64           `json:"next_after,omitempty"`
	Connections []connectionInfo `json:"connections"`
}

// listConnections returns the connections of reg that match q, sorted by id.
// Matching costs a lock per shard and no system call; only the connections
// listed have their socket read.
func listConnections(reg *registry, q listQuery) connectionList {
	// The id is copied next to the pointer so that sorting does not chase
	// 100k pointers around the heap.
	type entry struct {
		id uint64
		c  *Conn
	}
	var matched []entry
	if !q.remote.ip.IsValid() && !q.local.ip.IsValid() {
		matched = make([]entry, 0, reg.len()) // most will match: size it once
	}
	reg.each(func(c *Conn) bool {
		if c.id > q.after && q.remote.match(c.RemoteAddr()) && q.local.match(c.LocalAddr()) {
			matched = append(matched, entry{c.id, c})
		}
		return true
	})
	slices.SortFunc(matched, func(a, b entry) int { return cmp.Compare(a.id, b.id) })
	list := connectionList{Total: len(matched)}
	if len(matched) > q.limit {
		matched = matched[:q.limit]
		list.NextAfter = matched[len(matched)-1].id
	}
	list.Connections = make([]connectionInfo, 0, len(matched))
	for _, e := range matched {
		list.Connections = append(list.Connections, connectionInfoOf(e.c))
	}
	return list
}

// connectionInfo is one tracked connection as the admin API shows it: the
// answer to Kamailio's tcp_conid_state and HAProxy's "show sess".
type connectionInfo struct {
	// ID is the connection's conid, as in {l4.tcpops.conid}.
	ID uint64 `json:"id"`
	// Listen is the address of the listener that accepted the connection,
	// when the module that tracks it knows it (the layer4 handler does not:
	// caddy-l4 does not tell a handler its server; Local is then the
	// address the client connected to).
	Listen string `json:"listen,omitempty"`
	Remote string `json:"remote"`
	Local  string `json:"local"`
	// Status is "ok"; "eof" once the peer has finished sending (half-close)
	// while the session goes on; "error" once a read or write met a reset or
	// a timeout.
	Status   string    `json:"status"`
	Started  time.Time `json:"started"`
	AgeMs    int64     `json:"age_ms"`
	IdleMs   int64     `json:"idle_ms"`
	BytesIn  uint64    `json:"bytes_in"`  // read from the peer
	BytesOut uint64    `json:"bytes_out"` // written to the peer
	// LifetimeMs and MaxLifetimeMs are the limits in force, absent when
	// not set; the *LeftMs fields are the time until they expire.
	// MaxLifetimeMs is the connection's own, drawn with max_lifetime_jitter.
	LifetimeMs        *int64 `json:"lifetime_ms,omitempty"`
	LifetimeLeftMs    *int64 `json:"lifetime_left_ms,omitempty"`
	MaxLifetimeMs     *int64 `json:"max_lifetime_ms,omitempty"`
	MaxLifetimeLeftMs *int64 `json:"max_lifetime_left_ms,omitempty"`
	// Options are the tcpops options in force, merged over every tcpops
	// (and PATCH) that ran on the connection: what was asked for.
	Options Options `json:"options"`
	// Socket is what the kernel reports now: keepalive, TCP_USER_TIMEOUT
	// and TCP_INFO read back with getsockopt, so a setting the kernel
	// refused shows here as it really is.
	Socket      SocketState `json:"socket"`
	SocketError string      `json:"socket_error,omitempty"`
}

// connectionInfoOf snapshots c. It takes c's lock briefly and makes a few
// getsockopt calls; the data path is not held up.
func connectionInfoOf(c *Conn) connectionInfo {
	age := c.since()
	idle := max(0, age-time.Duration(c.lastActive.Load()))
	info := connectionInfo{
		ID:       c.id,
		Remote:   addrString(c.RemoteAddr()),
		Local:    addrString(c.LocalAddr()),
		Status:   "ok",
		Started:  c.start,
		AgeMs:    age.Milliseconds(),
		IdleMs:   idle.Milliseconds(),
		BytesIn:  c.bytesIn.Load(),
		BytesOut: c.bytesOut.Load(),
	}
	switch {
	case c.lastErr.Load() != nil:
		info.Status = "error"
	case c.readDone.Load():
		info.Status = "eof"
	}
	c.mu.Lock()
	info.Options = c.opts
	info.Listen = c.listen
	maxLifetime := c.maxLifetime // its own, drawn with the jitter
	c.mu.Unlock()
	if ka := info.Options.Keepalive; ka != nil {
		k := *ka // the snapshot must not share the Conn's Keepalive
		info.Options.Keepalive = &k
	}
	lifeLeft, maxLeft := c.timesLeft()
	if lt := info.Options.Lifetime.Duration(); lt > 0 && lifeLeft >= 0 {
		info.LifetimeMs, info.LifetimeLeftMs = millis(lt), millis(lifeLeft)
	}
	if ml := maxLifetime; ml > 0 && maxLeft >= 0 {
		info.MaxLifetimeMs, info.MaxLifetimeLeftMs = millis(ml), millis(maxLeft)
	}
	if c.tcp != nil {
		st, err := readSocketState(c.tcp)
		info.Socket = st
		if err != nil {
			info.SocketError = err.Error()
		}
	}
	return info
}

func millis(d time.Duration) *int64 {
	ms := d.Milliseconds()
	return &ms
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// setListen records the address of the listener that accepted c, for the
// admin API, when the module tracking c knows it.
func (c *Conn) setListen(addr net.Addr) {
	if addr == nil {
		return
	}
	s := addr.String()
	c.mu.Lock()
	c.listen = s
	c.mu.Unlock()
}

// isEnded reports whether the connection has ended.
func (c *Conn) isEnded() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ended
}

// endedWith returns the reason and cause of the connection's end; empty
// while it lives.
func (c *Conn) endedWith() (reason, cause string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason, c.cause
}

func apiError(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, allowed ...string) error {
	w.Header().Set("Allow", strings.Join(allowed, ", "))
	return apiError(http.StatusMethodNotAllowed, "tcpops: method %s not allowed on %s; allowed: %s",
		r.Method, r.URL.Path, strings.Join(allowed, ", "))
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError,
			Err: fmt.Errorf("tcpops: encoding response: %w", err)}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n')) // a failed write means the client went away
	return nil
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
)

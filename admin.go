package tcpops

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
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
	// door is the URL of the tcpops_api handler a request came through
	// (its site and the prefix the site strips), empty on the admin
	// endpoint: the log line of a change says which door made it.
	door string
}

// logChange logs a change at info level, saying which door made it: the
// admin API, or a tcpops_api handler, named by its URL in the field door
// (a site may mount several, under handle_path).
func (a *adminAPI) logChange(what string, fields ...zap.Field) {
	if a.door == "" {
		a.logger.Info("tcpops: "+what+" through the admin API", fields...)
		return
	}
	a.logger.Info("tcpops: "+what+" through tcpops_api", append(fields, zap.String("door", a.door))...)
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

// handleConnections serves the admin endpoint's /tcpops/connections.
func (a *adminAPI) handleConnections(w http.ResponseWriter, r *http.Request) error {
	return a.serveConnections(w, r, false)
}

// serveConnections serves /tcpops/connections and /tcpops/connections/{id}
// (r.URL.Path starts with adminConnectionsPath), dispatching on the path:
// the collection or one id. It is the one implementation behind both doors,
// the admin endpoint (handleConnections) and the tcpops_api HTTP handler
// (apihandler.go), so that they give the same answers; an error is an
// APIError, which each door turns into Caddy's admin JSON error. readOnly
// (tcpops_api's read_only) refuses PATCH and DELETE with 403 before the
// request is looked at any further.
func (a *adminAPI) serveConnections(w http.ResponseWriter, r *http.Request, readOnly bool) error {
	allowed := []string{http.MethodGet, http.MethodPatch, http.MethodDelete}
	if readOnly {
		if r.Method == http.MethodPatch || r.Method == http.MethodDelete {
			return apiError(http.StatusForbidden,
				"tcpops: %s refused: this tcpops_api is read_only, so it serves GET only; changing or closing connections needs a tcpops_api without read_only", r.Method)
		}
		allowed = []string{http.MethodGet}
	}
	rest, _ := strings.CutPrefix(r.URL.Path, adminConnectionsPath)
	rest = strings.TrimPrefix(rest, "/")
	if rest == "" {
		switch r.Method {
		case http.MethodGet:
			return a.handleList(w, r)
		case http.MethodPatch:
			return a.handlePatchMatching(w, r)
		case http.MethodDelete:
			return a.handleDeleteMatching(w, r)
		}
		return methodNotAllowed(w, r, allowed...)
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
		return methodNotAllowed(w, r, allowed...)
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

// handlePatchMatching answers PATCH /tcpops/connections?remote=&local=: the
// PATCH of one id applied to every connection that matches, in one request,
// so that a registrar that knows a phone by its address does not have to
// look the id up first and race the connection between two requests.
func (a *adminAPI) handlePatchMatching(w http.ResponseWriter, r *http.Request) error {
	q, err := parseActQuery(r)
	if err != nil {
		return err
	}
	opts, err := readOptions(w, r)
	if err != nil {
		return err
	}
	matched := matchingConnections(connections, q)
	// A change that one of them refuses (a max_lifetime it has outlived,
	// say) is refused for all of them, before any is changed: the request
	// is applied whole or not at all, as far as that can be known before it
	// runs.
	for _, c := range matched {
		if err := c.checkChange(&opts); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusConflict,
				Err: fmt.Errorf("%w; of the %d connections that match %s, none was changed", err, len(matched), q)}
		}
	}
	answer := patchedList{Filter: q.filter(), IDs: []uint64{}, Connections: []connectionInfo{}}
	for _, c := range matched {
		// One that ended meanwhile, or (by a hair) outlived the
		// max_lifetime since the check, is not acted on and not listed.
		if c.change(&opts, a.logger, true) != nil {
			continue
		}
		answer.IDs = append(answer.IDs, c.id)
		answer.Connections = append(answer.Connections, connectionInfoOf(c))
	}
	if len(answer.IDs) == 0 {
		return noMatch(q)
	}
	a.logChange("connections updated",
		zap.String("filter", q.String()), zap.Uint64s("conids", answer.IDs),
		zap.Any("options", opts), zap.String("requester", r.RemoteAddr))
	return writeJSON(w, http.StatusOK, answer)
}

// patchedList is the answer to a PATCH by address: the filter applied, the
// ids acted on, and each connection's state after the change.
type patchedList struct {
	Filter      queryFilter      `json:"filter"`
	IDs         []uint64         `json:"ids"`
	Connections []connectionInfo `json:"connections"`
}

// handleDeleteMatching answers DELETE /tcpops/connections?remote=&local=:
// closes every connection that matches.
func (a *adminAPI) handleDeleteMatching(w http.ResponseWriter, r *http.Request) error {
	q, err := parseActQuery(r)
	if err != nil {
		return err
	}
	answer := closedList{Filter: q.filter(), IDs: []uint64{}, Closed: []closedInfo{}}
	for _, c := range matchingConnections(connections, q) {
		if !c.closeWith(ReasonClosed, CauseAdmin) {
			continue // it ended meanwhile, for its own reason
		}
		answer.IDs = append(answer.IDs, c.id)
		reason, cause := c.endedWith() // closed/admin, or the peer's first move (events.md, Precedence)
		answer.Closed = append(answer.Closed, closedInfo{ID: c.id, Reason: reason, Cause: cause})
	}
	if len(answer.IDs) == 0 {
		return noMatch(q)
	}
	a.logChange("connections closed",
		zap.String("filter", q.String()), zap.Uint64s("conids", answer.IDs), zap.String("requester", r.RemoteAddr))
	return writeJSON(w, http.StatusOK, answer)
}

// closedList is the answer to a DELETE by address: the filter applied and
// the connections closed.
type closedList struct {
	Filter queryFilter  `json:"filter"`
	IDs    []uint64     `json:"ids"`
	Closed []closedInfo `json:"closed"`
}

func noMatch(q listQuery) error {
	return apiError(http.StatusNotFound, "tcpops: no connection matches %s", q)
}

// readOptions reads a PATCH body: of type application/json (parameters such
// as charset allowed), at most maxPatchBody bytes, one valid Options object
// that changes something.
func readOptions(w http.ResponseWriter, r *http.Request) (Options, error) {
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		return Options{}, apiError(http.StatusUnsupportedMediaType,
			"tcpops: Content-Type %q: the body must be application/json", ct)
	}
	return decodeOptions(http.MaxBytesReader(w, r.Body, maxPatchBody))
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
	opts, err := readOptions(w, r)
	if err != nil {
		return err
	}
	if err := c.change(&opts, a.logger, true); err != nil {
		return changeError(c, err)
	}
	a.logChange("connection updated",
		c.logFields(zap.Any("options", opts), zap.String("requester", r.RemoteAddr))...)
	return writeJSON(w, http.StatusOK, connectionInfoOf(c))
}

// changeError turns an error of Conn.change on c into the API's answer: 404
// for a connection that ended before the change, with why it ended (a
// timer may have ended it while the request was on its way), 409 for a
// max_lifetime it has already outlived.
func changeError(c *Conn, err error) error {
	var passed errMaxLifetimePassed
	var conflict errChangeConflict
	switch {
	case errors.Is(err, errConnEnded):
		reason, cause := c.endedWith()
		return apiError(http.StatusNotFound, "tcpops: connection %d ended (%s, %s) before it could be changed", c.id, reason, cause)
	case errors.As(err, &passed), errors.As(err, &conflict):
		return caddy.APIError{HTTPStatus: http.StatusConflict, Err: err}
	}
	return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
}

// decodeOptions reads one Options object: exact field names, each once,
// no unknown fields, no trailing data, every value in range
// (checkOptionsJSON, Validate), and at least one change.
func decodeOptions(body io.Reader) (Options, error) {
	var opts Options
	raw, err := io.ReadAll(body)
	if err != nil {
		if tooLarge := (*http.MaxBytesError)(nil); errors.As(err, &tooLarge) {
			return opts, apiError(http.StatusRequestEntityTooLarge,
				"tcpops: request body larger than %d bytes; an object of tcpops options is far smaller", tooLarge.Limit)
		}
		return opts, apiError(http.StatusBadRequest, "tcpops: reading request body: %v", err)
	}
	if len(bytes.TrimSpace(raw)) == 0 {
		return opts, apiError(http.StatusBadRequest, "tcpops: empty request body; want a JSON object of tcpops options")
	}
	if err := checkOptionsJSON(raw); err != nil {
		return opts, caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
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
	if reflect.ValueOf(opts).IsZero() {
		return opts, apiError(http.StatusBadRequest,
			"tcpops: the body changes nothing; give at least one of %s", strings.Join(optionsFields, ", "))
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
	if !c.closeWith(ReasonClosed, CauseAdmin) {
		reason, cause := c.endedWith()
		return apiError(http.StatusNotFound, "tcpops: connection %d ended (%s, %s) before it could be closed", id, reason, cause)
	}
	a.logChange("connection closed",
		c.logFields(zap.String("requester", r.RemoteAddr))...)
	reason, cause := c.endedWith() // closed/admin, or the peer's first move (events.md, Precedence)
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

// listQuery is a parsed /tcpops/connections query.
type listQuery struct {
	remote, local addrFilter
	limit         int
	after         uint64
}

// String gives the query's filters as they were written, for messages.
func (q listQuery) String() string {
	var parts []string
	if q.remote.ip.IsValid() {
		parts = append(parts, "remote="+q.remote.String())
	}
	if q.local.ip.IsValid() {
		parts = append(parts, "local="+q.local.String())
	}
	return strings.Join(parts, " ")
}

// queryFilter is the filter a PATCH or DELETE by address applied, as the
// answer shows it: an address the query did not filter on is left out.
type queryFilter struct {
	Remote string `json:"remote,omitempty"`
	Local  string `json:"local,omitempty"`
}

// filter returns q's filters for an answer.
func (q listQuery) filter() queryFilter {
	var f queryFilter
	if q.remote.ip.IsValid() {
		f.Remote = q.remote.String()
	}
	if q.local.ip.IsValid() {
		f.Local = q.local.String()
	}
	return f
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

func (f addrFilter) String() string {
	if f.port == 0 {
		return f.ip.String()
	}
	return netip.AddrPortFrom(f.ip, f.port).String()
}

// parseAddrFilter parses a remote= or local= filter: an IP, or an IP and a
// port. A form that could be read as "any" is refused, naming it, so that a
// filter never widens past what was written: port 0 (also written :00000),
// which addrFilter would take as every port of the IP, and the unspecified
// address (0.0.0.0, ::), which a listener reads as every address. The
// brackets of an IPv6 address come in a pair, around an IPv6 address.
func parseAddrFilter(param, s string) (addrFilter, error) {
	if s == "" {
		return addrFilter{}, nil
	}
	var f addrFilter
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return addrFilter{}, apiError(http.StatusBadRequest,
				"tcpops: %s %q: port 0 is no connection's port, and would match every port of %s; give a port from 1 to 65535, or the IP alone for every port",
				param, s, ap.Addr().Unmap())
		}
		f = addrFilter{ip: ap.Addr().Unmap(), port: ap.Port()}
	} else if ip, err := netip.ParseAddr(unbracket(s)); err == nil {
		f = addrFilter{ip: ip.Unmap()}
	} else {
		return addrFilter{}, apiError(http.StatusBadRequest,
			"tcpops: %s %q: want an IP address or IP:port (for IPv6: [addr]:port)", param, s)
	}
	if f.ip.IsUnspecified() {
		return addrFilter{}, apiError(http.StatusBadRequest,
			"tcpops: %s %q: the unspecified address %s is no connection's address (it reads as \"any\"); give the peer's or the local IP", param, s, f.ip)
	}
	return f, nil
}

// unbracket takes the brackets off "[addr]", an IPv6 address written as in
// a URL; any other use of a bracket is left for the parser to refuse.
func unbracket(s string) string {
	if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' && strings.Contains(s, ":") {
		return s[1 : len(s)-1]
	}
	return s
}

// parseListQuery parses the query of a GET on the collection.
func parseListQuery(r *http.Request) (listQuery, error) {
	return parseQuery(r, "remote", "local", "limit", "after")
}

// parseActQuery parses the query of a PATCH or DELETE on the collection,
// which acts on every connection that matches: it must name an address,
// and takes no paging, which would make it act on some matches only.
func parseActQuery(r *http.Request) (listQuery, error) {
	q, err := parseQuery(r, "remote", "local")
	if err != nil {
		return q, err
	}
	if !q.remote.ip.IsValid() && !q.local.ip.IsValid() {
		return q, apiError(http.StatusBadRequest,
			"tcpops: %s %s acts on every connection that matches remote= and/or local=, and neither is given; to act on one connection use %s/{id}",
			r.Method, adminConnectionsPath, adminConnectionsPath)
	}
	return q, nil
}

// parseQuery parses a query of the collection strictly: a query that does
// not parse (url.Query would drop the pair without a word, leaving the
// others to act on more than was named), a parameter not in allowed, one
// given twice, or one given empty is refused, naming it, so that a typo
// never widens what a PATCH or DELETE acts on.
func parseQuery(r *http.Request, allowed ...string) (listQuery, error) {
	q := listQuery{limit: defaultListLimit}
	v, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return q, apiError(http.StatusBadRequest, "tcpops: query %q: %v; nothing was done", r.URL.RawQuery, err)
	}
	for _, name := range slices.Sorted(maps.Keys(v)) {
		switch {
		case !slices.Contains(allowed, name):
			return q, apiError(http.StatusBadRequest,
				"tcpops: unknown query parameter %q for %s; allowed: %s", name, r.Method, strings.Join(allowed, ", "))
		case len(v[name]) > 1:
			return q, apiError(http.StatusBadRequest,
				"tcpops: query parameter %q is given %d times; give it once", name, len(v[name]))
		case v[name][0] == "":
			return q, apiError(http.StatusBadRequest, "tcpops: query parameter %q is empty; give a value or leave it out", name)
		}
	}
	if q.remote, err = parseAddrFilter("remote", v.Get("remote")); err != nil {
		return q, err
	}
	if q.local, err = parseAddrFilter("local", v.Get("local")); err != nil {
		return q, err
	}
	if s := v.Get("limit"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil || n < 1 || n > maxListLimit {
			return q, apiError(http.StatusBadRequest,
				"tcpops: limit %q: must be an integer between 1 and %d", s, maxListLimit)
		}
		q.limit = int(n)
	}
	if s := v.Get("after"); s != "" {
		if q.after, err = strconv.ParseUint(s, 10, 64); err != nil {
			return q, apiError(http.StatusBadRequest, "tcpops: after %q: must be a connection id, an integer between 0 and %d", s, uint64(math.MaxUint64))
		}
	}
	return q, nil
}

// connectionList is the answer to GET /tcpops/connections.
type connectionList struct {
	// Total is how many connections match the filters, on every page.
	Total int `json:"total"`
	// NextAfter, set when there are more connections after this page, is
	// the value of ?after= that returns the next page.
	NextAfter   uint64           `json:"next_after,omitempty"`
	Connections []connectionInfo `json:"connections"`
}

// listConnections returns a page of the connections of reg that match q,
// in id order. Finding them costs the same whatever the number of
// connections (a binary search for ?after=, or the remote address index),
// except with a local= filter alone, which walks the connections in id
// order; only the connections listed have their socket read.
func listConnections(reg *registry, q listQuery) connectionList {
	var page []*Conn
	list := connectionList{}
	switch {
	case q.remote.ip.IsValid() && (q.remote.port != 0 || q.local.ip.IsValid()):
		// By IP:port (the connections of one address: one or two), or
		// by two filters: what matches, then the page of it.
		matched := matchingConnections(reg, q)
		list.Total = len(matched)
		i, _ := slices.BinarySearchFunc(matched, q.after, func(c *Conn, id uint64) int { return cmp.Compare(c.id, id) })
		if i < len(matched) && matched[i].id == q.after {
			i++
		}
		page = matched[i:]
	case q.remote.ip.IsValid():
		// By IP: the page of the IP's chain, at the cost of the page.
		page, list.Total = reg.remotePage(q.remote.ip, q.after, q.limit+1)
	case q.local.ip.IsValid():
		reg.each(func(c *Conn) bool {
			if _, local := c.addrs(); q.local.match(local) {
				list.Total++
				if c.id > q.after && len(page) <= q.limit {
					page = append(page, c)
				}
			}
			return true
		})
	default:
		list.Total = reg.len()
		page = make([]*Conn, 0, min(q.limit+1, eachBatch))
		reg.eachAfter(q.after, func(c *Conn) bool {
			page = append(page, c)
			return len(page) <= q.limit
		})
	}
	if len(page) > q.limit {
		page = page[:q.limit]
		list.NextAfter = page[len(page)-1].id
	}
	list.Connections = make([]connectionInfo, 0, len(page))
	for _, c := range page {
		list.Connections = append(list.Connections, connectionInfoOf(c))
	}
	return list
}

// matchingConnections returns every live connection of reg that matches
// q's filters, in id order: through the remote address index when q has a
// remote filter, else by walking the registry.
func matchingConnections(reg *registry, q listQuery) []*Conn {
	if q.remote.ip.IsValid() {
		matched := reg.byRemoteAddr(q.remote.ip, q.remote.port)
		return slices.DeleteFunc(matched, func(c *Conn) bool { _, local := c.addrs(); return !q.local.match(local) })
	}
	var matched []*Conn
	reg.each(func(c *Conn) bool {
		if _, local := c.addrs(); q.local.match(local) {
			matched = append(matched, c)
		}
		return true
	})
	return matched
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
	// Remote and Local are the connection's addresses: behind Caddy's
	// proxy_protocol listener wrapper, the PROXY header's, and empty until
	// the connection's first read has taken the header (asking sooner would
	// wait for the client).
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
	remote, local := c.addrs()
	info := connectionInfo{
		ID:       c.id,
		Remote:   addrString(remote),
		Local:    addrString(local),
		Status:   "ok",
		Started:  c.start,
		AgeMs:    age.Milliseconds(),
		IdleMs:   idle.Milliseconds(),
		BytesIn:  c.bytesIn.Load(),
		BytesOut: c.bytesOut.Load(),
	}
	switch {
	case c.errEnd.Load() != nil:
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

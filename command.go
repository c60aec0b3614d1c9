package tcpops

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/tcpops/caddy-tcpops/internal/termsafe"
)

// init registers `caddy tcpops` the way Caddy's own modules register their
// commands, so that every build with the plugin has it.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:      "tcpops",
		Usage:     "list|show|set|close [<id>] [flags] [--address <interface>] [--config <path> [--adapter <name>]] [--url <base> ...] [--timeout <d>]",
		Short:     "Lists, shows, changes and closes the connections tcpops tracks",
		Long:      commandLong,
		CobraFunc: setUpCommand,
	})
}

var commandLong = `
Lists, shows, changes and closes the TCP connections that tcpops tracks
(layer4.handlers.tcpops, caddy.listeners.tcpops) in a running Caddy, through
its admin API (/tcpops/connections) or a tcpops_api handler. It is
Kamailio's tcp_* conid functions and HAProxy's "show sess" and "shutdown
session", from the shell.

  list    One row per connection: id, remote and local address, age, idle
          time, time left of lifetime and max_lifetime, keepalive as
          idle/count/interval, user timeout, bytes in and out, TCP state.
          --remote and --local filter (IP or IP:port). Every connection,
          page after page; --limit caps the list, --after starts it later.
            caddy tcpops list --remote 192.0.2.7

  show    One connection in full, with the socket options and TCP_INFO read
          back from the kernel.
            caddy tcpops show 4711

  set     Changes one connection, or with --remote/--local every one that
          matches, as a later tcpops in a route would, and prints it after
          the change.
            caddy tcpops set 4711 --lifetime 10m
            caddy tcpops set --remote 192.0.2.7 --keepalive 30,3,10

  close   Closes one connection, or with --remote/--local every one that
          matches, and prints what it closed.
            caddy tcpops close 4711

Durations are written as in the Caddyfile: 90s, 1m30s, 1d, and a bare
integer is seconds. Durations printed use h, m and s; a time left is never
rounded up. --json prints the API's answer, for scripts ('list --json': one
answer with every connection). 'caddy help tcpops <subcommand>' says more.

The admin endpoint is found as 'caddy stop' finds it: --address; else the
admin address of the config given with --config (and --adapter); else
` + caddy.DefaultAdminListen + `. A unix socket is written unix//path/to/admin.sock.

--url talks to a tcpops_api handler on a Caddy site instead (the same API,
behind Caddy's HTTP auth), given by the URL it is mounted at: with --url
https://edge1.example:8443/ops, the API is
https://edge1.example:8443/ops/tcpops/connections. Credentials never go in
a flag, which ps shows: HTTP basic auth is user:password on the first line
of --auth-file, else in $` + authEnv + `, sent over https only (or plain
http to a loopback address); --ca-file trusts a private CA;
--cert-file and --key-file present a client certificate. --url may be
repeated, for a registrar behind several edges: list labels each row with
its edge, and set and close by --remote/--local act on every edge and say
which edges matched (an id belongs to one edge: give one --url with it).

Each request may take --timeout (default ` + defaultTimeout.String() + `), its answer included.

Exit status:
  0  done; also a list that matches nothing, which prints the empty answer
  1  usage: a bad flag, argument or value, refused before any request or by
     the API (HTTP 400, 405, 409, 413, 415)
  2  nothing matched: show, set or close found no connection (the API's
     own HTTP 404; any other 404, such as a wrong --url path, is 3)
  3  an endpoint could not be reached, did not answer within --timeout,
     refused the TLS handshake or the credentials (HTTP 401, 403), failed
     (HTTP 5xx), redirected (HTTP 3xx: never followed), or answered with
     something that is not the tcpops API's answer to the request;
     with several --url, if any edge did (the others are still acted on)
Every error is one line on stderr, with the HTTP status and the endpoint
that answered.
`

// setUpCommand gives cmd, Caddy's cobra command for `caddy tcpops`, its
// subcommands and the flags that find the API. Caddy calls it each time it
// builds its command tree, so every build gets fresh flag values and
// nothing is shared between runs.
func setUpCommand(cmd *cobra.Command) {
	ep := new(endpointFlags)
	ep.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		// cobra suggests a near miss only for the root's subcommands.
		return fmt.Errorf("tcpops: unknown subcommand %q: want list, show, set or close", args[0])
	}
	cmd.AddCommand(listCommand(ep), showCommand(ep), setCommand(ep), closeCommand(ep))
	// Caddy's root command ends every help with a pointer to Caddy's
	// command-line docs, which say nothing of tcpops (issue 28); the
	// subcommands inherit this template from cmd.
	cmd.SetHelpTemplate(cmd.HelpTemplate() + "\n" + commandDocsFooter + "\n")
}

// commandDocsFooter ends `caddy help tcpops` and its subcommands' help in
// place of Caddy's footer.
const commandDocsFooter = `Full documentation of tcpops, this command included ("From the shell"):
https://github.com/tcpops/caddy-tcpops (README.md and docs/admin.md)`

// oneEndpoint returns the one endpoint a command about one connection id
// talks to: a connection id is only meaningful on the Caddy that gave it.
func oneEndpoint(ep *endpointFlags) (*endpoint, error) {
	eps, err := ep.endpoints()
	if err != nil {
		return nil, err
	}
	if len(eps) > 1 {
		return nil, fmt.Errorf("tcpops: a connection id belongs to one edge: give one --url with it, or --remote/--local for every edge (%d --url given)", len(eps))
	}
	return eps[0], nil
}

// oneLine folds s onto one line, so that every error is one line on
// stderr, and escapes what a server may have put in it to act on the
// terminal (termsafe.Text).
func oneLine(s string) string {
	return termsafe.Text(strings.Join(strings.Fields(s), " "))
}

// filterFlags are --remote and --local, the admin API's filters.
type filterFlags struct {
	remote, local string
}

func (f *filterFlags) add(cmd *cobra.Command, what string) {
	cmd.Flags().StringVar(&f.remote, "remote", "", what+" from this peer: IP or IP:port ([addr]:port for IPv6)")
	cmd.Flags().StringVar(&f.local, "local", "", what+" to this local address: IP or IP:port")
}

func (f filterFlags) isSet() bool { return f.remote != "" || f.local != "" }

// query checks the filters as the admin API will, so that a typo fails
// before any request, and returns them as query parameters.
func (f filterFlags) query() (url.Values, error) {
	q := url.Values{}
	for _, p := range []struct{ name, v string }{{"remote", f.remote}, {"local", f.local}} {
		if p.v == "" {
			continue
		}
		if _, err := parseAddrFilter(p.name, p.v); err != nil {
			return nil, flagError(p.name, p.v, err)
		}
		q.Set(p.name, p.v)
	}
	return q, nil
}

// parse parses the filters as the admin API will: the query it acts on,
// whose String and filter are how the API's answers write it back.
func (f filterFlags) parse() (listQuery, error) {
	var q listQuery
	var err error
	if q.remote, err = parseAddrFilter("remote", f.remote); err != nil {
		return q, flagError("remote", f.remote, err)
	}
	if q.local, err = parseAddrFilter("local", f.local); err != nil {
		return q, flagError("local", f.local, err)
	}
	return q, nil
}

// String describes the filters in the words of the admin API's 404 for a
// PATCH or DELETE that matches nothing ("remote=192.0.2.7:5060"), so that
// list says it the same way.
func (f filterFlags) String() string {
	var s []string
	if f.remote != "" {
		s = append(s, "remote="+f.remote)
	}
	if f.local != "" {
		s = append(s, "local="+f.local)
	}
	return strings.Join(s, " ")
}

// flagError names the flag and the value, then says what is wrong with
// the words of the Caddyfile's message.
func flagError(flag, value string, err error) error {
	return fmt.Errorf("--%s %s: %s", flag, value, strings.TrimPrefix(err.Error(), "tcpops: "))
}

// parseConnID parses a connection id as the admin API does.
func parseConnID(s string) (uint64, error) {
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("tcpops: invalid connection id %q: must be a decimal integer", s)
	}
	return id, nil
}

func connPath(id uint64) string {
	return adminConnectionsPath + "/" + strconv.FormatUint(id, 10)
}

func withQuery(path string, q url.Values) string {
	if len(q) == 0 {
		return path
	}
	// A colon needs no escape in a query; left as it is, the admin log
	// shows remote=192.0.2.7:5060.
	return path + "?" + strings.ReplaceAll(q.Encode(), "%3A", ":")
}

// listFlags are the flags of `caddy tcpops list`.
type listFlags struct {
	filter filterFlags
	limit  int
	after  uint64
	json   bool
}

// listPage is how many connections list asks for in one request: the
// admin API's default page.
const listPage = defaultListLimit

func listCommand(ep *endpointFlags) *cobra.Command {
	var f listFlags
	cmd := &cobra.Command{
		Use:   "list [--remote <ip[:port]>] [--local <ip[:port]>] [--limit <n>] [--after <id>] [--json]",
		Short: "Lists the tracked connections, one row each",
		Long: `
Lists the connections tcpops tracks, sorted by id, one row each: id, remote
and local address, age, idle time (since the last byte either way), the
time left of lifetime and max_lifetime, keepalive as idle/count/interval
(or off) and user timeout as the kernel reports them, bytes in (from the
peer) and out, and the TCP state where the kernel says it (Linux). A dash
is a value not set. The last line counts the connections.

It lists every connection that matches, following the API's pages to the
end. --limit caps the list; the last line then says how to get the next
part. --json prints one answer in the API's form, {"total": N,
"connections": [...]} with every connection, and "next_after" when --limit
cut it.

A filter that matches no connection is not an error: the list is empty
("0 connections", or {"total":0,"connections":[]}) and the exit status 0.

With several --url, each row (and each connection in --json, as "edge")
says which edge it is on; --limit and --after, which page one edge, are
refused.`,
		Example: `  caddy tcpops list
  caddy tcpops list --remote 192.0.2.7:5060
  caddy tcpops list --local 127.0.0.1:5060 --limit 100 --after 4711
  caddy tcpops list --json | jq '.connections[].id'
  caddy tcpops list --url https://edge1.example:8443 --url https://edge2.example:8443 --remote 192.0.2.7`,
		Args: cobra.NoArgs,
		RunE: commandStatus(func(cmd *cobra.Command, _ []string) error {
			if cmd.Flags().Changed("limit") && (f.limit < 1 || f.limit > math.MaxInt32) {
				return fmt.Errorf("--limit %d: must be between 1 and %d", f.limit, math.MaxInt32)
			}
			return runList(cmd, ep, &f)
		}),
	}
	f.filter.add(cmd, "Only connections")
	cmd.Flags().IntVar(&f.limit, "limit", 0, "At most this many connections (default: all)")
	cmd.Flags().Uint64Var(&f.after, "after", 0, "Only connections with a greater id: the next part of a list cut by --limit")
	cmd.Flags().BoolVar(&f.json, "json", false, "Print one answer in the API's JSON form, with every connection")
	return cmd
}

// listed is a list fetched from one endpoint, every page of it.
type listed struct {
	total     int
	nextAfter uint64 // set when --limit cut the list
	conns     []connectionInfo
	raw       []json.RawMessage // each connection as the API wrote it
	after     uint64            // --after
	ep        *endpoint
	err       error
}

func runList(cmd *cobra.Command, ep *endpointFlags, f *listFlags) error {
	q, err := f.filter.query()
	if err != nil {
		return err
	}
	eps, err := ep.endpoints()
	if err != nil {
		return err
	}
	if len(eps) > 1 && (f.limit != 0 || f.after != 0) {
		return errors.New("tcpops: --limit and --after page the list of one edge: give one --url with them")
	}
	w, errw := cmd.OutOrStdout(), cmd.ErrOrStderr()
	var lists []*listed
	failed := 0
	for _, e := range eps {
		l := fetchList(e, q, f.limit, f.after)
		if l.err != nil {
			if len(eps) == 1 {
				return l.err
			}
			failed++
			fmt.Fprintln(errw, "Error:", oneLine(l.err.Error()))
			continue
		}
		lists = append(lists, l)
	}
	multi := len(eps) > 1
	if f.json {
		err = writeListJSON(w, lists, multi)
	} else {
		err = writeListTable(w, cmd, ep, f, lists, multi)
	}
	if err != nil {
		return err
	}
	if failed > 0 {
		return withStatus(exitUnreachable, fmt.Errorf("tcpops: %d of %d edges could not be listed", failed, len(eps)))
	}
	return nil
}

// maxListed bounds what list holds from one edge: twice the 1,000,000
// connections the API is built for (docs/admin.md, Cost), about 2 GB of
// answers. An edge that announces a larger total is not believed.
const maxListed = 2_000_000

// fetchList gets the connections of e that match q, page after page, from
// the first id after after, until the end or limit (0: no limit). Each page
// must be the API's answer to the page asked for: at most the connections
// asked for, in id order after after, and next_after the last of them. It
// stops with an error at a page that does not move on, and when the edge
// has sent far more connections than the totals it announced (twice the
// largest and a page: connections that come while the list is read are
// listed too), or than maxListed: an edge that always answers a full page
// and a new next_after would otherwise be asked forever.
func fetchList(e *endpoint, filter url.Values, limit int, after uint64) *listed {
	l := &listed{ep: e, after: after}
	maxTotal := 0
	for {
		n := listPage
		if limit > 0 {
			n = min(n, limit-len(l.conns))
		}
		q := url.Values{}
		for k, v := range filter {
			q[k] = v
		}
		q.Set("limit", strconv.Itoa(n))
		if after != 0 {
			q.Set("after", strconv.FormatUint(after, 10))
		}
		c := call{method: http.MethodGet, path: withQuery(adminConnectionsPath, q)}
		body, err := e.do(c)
		if err != nil {
			l.err = err
			return l
		}
		var page struct {
			Total       int               `json:"total"`
			NextAfter   uint64            `json:"next_after"`
			Connections []json.RawMessage `json:"connections"`
		}
		pageAfter := after
		var ids []uint64
		err = e.decode(c, body, &page, []string{"total", "connections"}, func() error {
			if page.Total < 0 || len(page.Connections) > n {
				return fmt.Errorf("total %d and %d connections for a page of %d", page.Total, len(page.Connections), n)
			}
			for _, raw := range page.Connections {
				var ci connectionInfo
				if err := decodeFields(raw, &ci, connKeys); err != nil {
					return fmt.Errorf("a connection: %w", err)
				}
				if last := pageAfter; len(ids) > 0 {
					last = ids[len(ids)-1]
					if ci.ID <= last {
						return fmt.Errorf("connection %d after %d: not in id order", ci.ID, last)
					}
				} else if ci.ID <= last {
					return fmt.Errorf("connection %d on the page after id %d", ci.ID, last)
				}
				ids = append(ids, ci.ID)
				l.conns = append(l.conns, ci)
				l.raw = append(l.raw, raw)
			}
			if page.NextAfter != 0 && (len(ids) == 0 || page.NextAfter != ids[len(ids)-1]) {
				return fmt.Errorf("next_after %d is not the page's last id", page.NextAfter)
			}
			return nil
		})
		if err != nil {
			l.err = err
			return l
		}
		l.total = page.Total
		maxTotal = max(maxTotal, page.Total)
		if page.NextAfter == 0 {
			return l
		}
		if len(l.conns) > 2*maxTotal+listPage || len(l.conns) > maxListed {
			l.err = withStatus(exitUnreachable, fmt.Errorf("tcpops: %s has sent %d connections, far more than the %d it announced (at most %d are listed): stopped",
				e.name(), len(l.conns), maxTotal, maxListed))
			return l
		}
		if limit > 0 && len(l.conns) >= limit {
			l.nextAfter = page.NextAfter
			return l
		}
		after = page.NextAfter
	}
}

// connKeys are the fields every connection the API shows has.
var connKeys = []string{"id", "remote", "local", "status", "started", "options", "socket"}

// writeListJSON writes the lists as one answer of the API's form. With
// several edges each connection carries its edge, as "edge".
func writeListJSON(w io.Writer, lists []*listed, multi bool) error {
	var out struct {
		Total       int               `json:"total"`
		NextAfter   uint64            `json:"next_after,omitempty"`
		Connections []json.RawMessage `json:"connections"`
	}
	out.Connections = []json.RawMessage{}
	for _, l := range lists {
		out.Total += l.listTotal()
		out.NextAfter = l.nextAfter
		for _, raw := range l.raw {
			if multi {
				raw = withEdge(raw, l.ep.label)
			}
			out.Connections = append(out.Connections, raw)
		}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	_, err = w.Write(append(termsafe.JSON(b), '\n'))
	return err
}

// listTotal is the total of a list in the API's sense, every connection
// that matches: the connections listed when the list is whole (what
// matched while it was read, page after page), else the last page's count,
// which counts those before --after and after --limit too.
func (l *listed) listTotal() int {
	if l.nextAfter == 0 && l.after == 0 {
		return len(l.conns)
	}
	return l.total
}

// withEdge adds "edge" to a connection object as the API wrote it.
func withEdge(raw json.RawMessage, edge string) json.RawMessage {
	e, _ := json.Marshal(edge)
	raw = bytes.TrimSpace(raw)
	if len(raw) < 2 || raw[0] != '{' {
		return raw
	}
	sep := ","
	if bytes.Equal(bytes.TrimSpace(raw[1:]), []byte("}")) {
		sep = ""
	}
	return json.RawMessage(`{"edge":` + string(e) + sep + string(raw[1:]))
}

func writeListTable(w io.Writer, cmd *cobra.Command, ep *endpointFlags, f *listFlags, lists []*listed, multi bool) error {
	var conns []connectionInfo
	var edges []string
	for _, l := range lists {
		conns = append(conns, l.conns...)
		for range l.conns {
			edges = append(edges, l.ep.label)
		}
	}
	if !multi {
		edges = nil
	}
	if err := writeConnTable(w, conns, edges); err != nil {
		return err
	}
	n := len(conns)
	if multi {
		_, err := fmt.Fprintf(w, "%d %s on %d %s\n", n, plural(n, "connection"), len(lists), plural(len(lists), "edge"))
		return err
	}
	if len(lists) == 0 {
		return nil
	}
	l := lists[0]
	var err error
	switch {
	case l.nextAfter != 0:
		next := append(strings.Fields(cmd.CommandPath()), ep.args()...)
		for _, p := range []struct{ name, v string }{{"remote", f.filter.remote}, {"local", f.filter.local}} {
			if p.v != "" {
				next = append(next, "--"+p.name, p.v)
			}
		}
		next = append(next, "--limit", strconv.Itoa(f.limit), "--after", strconv.FormatUint(l.nextAfter, 10))
		_, err = fmt.Fprintf(w, "%d of %d %s; next page: %s\n", n, l.total, plural(l.total, "connection"), shellJoin(next))
	case f.after != 0:
		// The API's total counts every match, before --after too.
		_, err = fmt.Fprintf(w, "%d of %d %s after id %d\n", n, l.total, plural(l.total, "connection"), f.after)
	default:
		_, err = fmt.Fprintf(w, "%d %s\n", n, plural(n, "connection"))
	}
	return err
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

// shellJoin joins args into a command line a shell reads back as args.
func shellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		// Brackets are a glob ([::1] matches a file named 1 or :), so an
		// IPv6 address is quoted.
		if a != "" && strings.Trim(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:/=@%+") == "" {
			out[i] = a
		} else {
			out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(out, " ")
}

// writeConnTable writes one aligned row per connection; with edges, the
// edge of each first, in a column of its own. What the server sent is
// escaped (termsafe.Text): a tab or newline in it would break the columns,
// an ESC act on the terminal.
func writeConnTable(w io.Writer, conns []connectionInfo, edges []string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	edge := func(i int) string {
		if edges == nil {
			return ""
		}
		if i < 0 {
			return "EDGE\t"
		}
		return edges[i] + "\t"
	}
	fmt.Fprintln(tw, edge(-1)+"ID\tREMOTE\tLOCAL\tAGE\tIDLE\tLIFE_LEFT\tMAX_LEFT\tKEEPALIVE\tUSER_TIMEOUT\tIN\tOUT\tSTATE")
	for i, c := range conns {
		fmt.Fprintf(tw, "%s%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			edge(i), c.ID, termsafe.Text(c.Remote), termsafe.Text(c.Local),
			humanDuration(msDuration(c.AgeMs)), humanDuration(msDuration(c.IdleMs)),
			leftColumn(c.LifetimeLeftMs), leftColumn(c.MaxLifetimeLeftMs),
			keepaliveColumn(c), userTimeoutColumn(c),
			humanBytes(c.BytesIn), humanBytes(c.BytesOut),
			termsafe.Text(stateColumn(c)))
	}
	return tw.Flush()
}

func msDuration(ms int64) time.Duration {
	if ms > math.MaxInt64/int64(time.Millisecond) {
		return math.MaxInt64
	}
	return time.Duration(ms) * time.Millisecond
}

func leftColumn(ms *int64) string {
	if ms == nil {
		return "-"
	}
	return leftDuration(msDuration(*ms))
}

// keepaliveColumn is keepalive as idle/count/interval, as the kernel
// reports it; off Linux, where nothing is read back, as it was asked for.
func keepaliveColumn(c connectionInfo) string {
	if s := c.Socket; s.Keepalive != nil {
		if !*s.Keepalive {
			return "off"
		}
		secs := func(p *int) string {
			if p == nil {
				return "-"
			}
			return exactDuration(time.Duration(*p) * time.Second)
		}
		count := "-"
		if s.KeepaliveCount != nil {
			count = strconv.Itoa(*s.KeepaliveCount)
		}
		return secs(s.KeepaliveIdle) + "/" + count + "/" + secs(s.KeepaliveInterval)
	}
	return keepaliveOption(c.Options.Keepalive)
}

// keepaliveOption is the keepalive asked for, as idle/count/interval.
func keepaliveOption(ka *Keepalive) string {
	switch {
	case ka == nil:
		return "-"
	case ka.Off:
		return "off"
	}
	d := func(v Duration) string {
		if v == 0 {
			return "-"
		}
		return exactDuration(time.Duration(v))
	}
	count := "-"
	if ka.Count != 0 {
		count = strconv.Itoa(ka.Count)
	}
	return d(ka.Idle) + "/" + count + "/" + d(ka.Interval)
}

// userTimeoutColumn is TCP_USER_TIMEOUT as the kernel reports it ("-": the
// kernel's default), or off Linux as it was asked for.
func userTimeoutColumn(c connectionInfo) string {
	if ms := c.Socket.UserTimeoutMillis; ms != nil {
		if *ms == 0 {
			return "-"
		}
		return exactDuration(time.Duration(*ms) * time.Millisecond)
	}
	return optionalDurationOption(c.Options.UserTimeout)
}

func optionalDurationOption(d OptionalDuration) string {
	switch {
	case !d.IsSet():
		return "-"
	case d.IsOff():
		return "off"
	}
	return exactDuration(d.Duration())
}

// stateColumn is the kernel's TCP state, with tcpops' status when it is
// not ok ("ESTAB,eof": the peer has finished sending).
func stateColumn(c connectionInfo) string {
	state := "-"
	if ti := c.Socket.TCPInfo; ti != nil && ti.State != "" {
		state = ti.State
	}
	if c.Status != "" && c.Status != "ok" {
		if state == "-" {
			return c.Status
		}
		state += "," + c.Status
	}
	return state
}

func showCommand(ep *endpointFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show <id> [--json]",
		Short: "Shows one connection in full",
		Long: `
Shows one connection in full: addresses, status, age, idle time, bytes, the
lifetimes and the time left of each, the options asked for (every tcpops
and change merged), and what the kernel reports for the socket: keepalive,
TCP_USER_TIMEOUT and TCP_INFO (state, round-trip time, retransmissions,
unanswered keepalive probes, unacknowledged segments, time since data was
last received and sent). The socket is read on Linux only.

An id that no live connection has is exit status 2.`,
		Example: `  caddy tcpops show 4711
  caddy tcpops show 4711 --json`,
		Args: exactlyOneID,
		RunE: commandStatus(func(cmd *cobra.Command, args []string) error {
			id, err := parseConnID(args[0])
			if err != nil {
				return err
			}
			e, err := oneEndpoint(ep)
			if err != nil {
				return err
			}
			c := call{method: http.MethodGet, path: connPath(id), noMatch: noMatchOfID(id)}
			body, err := e.do(c)
			if err != nil {
				return err
			}
			var ci connectionInfo
			if err := e.decode(c, body, &ci, connKeys, isConn(&ci, id)); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				_, err := w.Write(termsafe.JSON(body))
				return err
			}
			return writeConnDetail(w, ci)
		}),
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "Print the API's JSON as it is")
	return cmd
}

func exactlyOneID(_ *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("tcpops: want one connection id; got %d arguments", len(args))
	}
	return nil
}

// writeConnDetail writes every field of c, one per line, escaping what
// the server sent (termsafe.Text).
func writeConnDetail(w io.Writer, c connectionInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(k, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t%s\n", k, termsafe.Text(fmt.Sprintf(format, args...)))
	}
	line("id", "%d", c.ID)
	line("remote", "%s", c.Remote)
	line("local", "%s", c.Local)
	if c.Listen != "" {
		line("listen", "%s", c.Listen)
	}
	line("status", "%s", c.Status)
	line("started", "%s", c.Started.Format(time.RFC3339Nano))
	line("age", "%s", humanDuration(msDuration(c.AgeMs)))
	line("idle", "%s", humanDuration(msDuration(c.IdleMs)))
	line("bytes in", "%s (%d)", humanBytes(c.BytesIn), c.BytesIn)
	line("bytes out", "%s (%d)", humanBytes(c.BytesOut), c.BytesOut)
	limit := func(k string, total, left *int64) {
		if total == nil {
			line(k, "-")
			return
		}
		line(k, "%s, %s left", exactDuration(msDuration(*total)), leftColumn(left))
	}
	limit("lifetime", c.LifetimeMs, c.LifetimeLeftMs)
	limit("max_lifetime", c.MaxLifetimeMs, c.MaxLifetimeLeftMs)
	o := c.Options
	events := "-"
	if o.Events != nil {
		events = map[bool]string{true: "on", false: "off"}[*o.Events]
	}
	line("asked for", "keepalive %s, user_timeout %s, lifetime %s, max_lifetime %s, events %s",
		keepaliveOption(o.Keepalive), optionalDurationOption(o.UserTimeout),
		optionalDurationOption(o.Lifetime), optionalDurationOption(o.MaxLifetime), events)
	s := c.Socket
	if s.Keepalive != nil {
		line("socket keepalive", "%s", keepaliveColumn(c))
	}
	if s.UserTimeoutMillis != nil {
		line("socket user_timeout", "%s", userTimeoutColumn(c))
	}
	if ti := s.TCPInfo; ti != nil {
		us := func(v uint32) string { return humanDuration(time.Duration(v) * time.Microsecond) }
		ms := func(v uint32) string { return humanDuration(time.Duration(v) * time.Millisecond) }
		line("tcp state", "%s", ti.State)
		line("tcp rtt", "%s (variation %s)", us(ti.RTTMicros), us(ti.RTTVarMicros))
		line("tcp retransmits", "%d now, %d in all", ti.Retransmits, ti.TotalRetrans)
		line("tcp probes", "%d unanswered keepalive probes", ti.Probes)
		line("tcp unacked", "%d segments", ti.Unacked)
		line("tcp last recv", "%s ago", ms(ti.LastDataRecvMs))
		line("tcp last sent", "%s ago", ms(ti.LastDataSentMs))
	}
	if c.SocketError != "" {
		line("socket", "%s", c.SocketError)
	}
	return tw.Flush()
}

// target returns the request set and close send: about one connection by
// id, or with --remote/--local about the collection, which the API then
// narrows to every live connection that matches; the id, or the filters
// as the API writes them back.
func target(method string, args []string, f filterFlags, body []byte) (c call, id uint64, q listQuery, err error) {
	c = call{method: method, body: body}
	switch {
	case len(args) > 1:
		return c, 0, q, fmt.Errorf("tcpops: want one connection id; got %d arguments", len(args))
	case len(args) == 1 && f.isSet():
		return c, 0, q, fmt.Errorf("tcpops: give a connection id or --remote/--local, not both")
	case len(args) == 1:
		if id, err = parseConnID(args[0]); err != nil {
			return c, 0, q, err
		}
		c.path, c.noMatch = connPath(id), noMatchOfID(id)
		return c, id, q, nil
	case !f.isSet():
		return c, 0, q, fmt.Errorf("tcpops: give a connection id, or --remote/--local for every connection that matches")
	}
	if q, err = f.parse(); err != nil {
		return c, 0, q, err
	}
	v, err := f.query()
	if err != nil {
		return c, 0, q, err
	}
	c.path, c.noMatch = withQuery(adminConnectionsPath, v), noMatchOfFilter(q)
	return c, 0, q, nil
}

// isConn checks that the answer ci is about connection id.
func isConn(ci *connectionInfo, id uint64) func() error {
	return func() error {
		if ci.ID != id {
			return fmt.Errorf("connection %d, not %d", ci.ID, id)
		}
		return nil
	}
}

// isClosed checks that the answer ci to a DELETE says connection id
// ended, and how.
func isClosed(ci *closedInfo, id uint64) func() error {
	return func() error {
		if ci.ID != id || ci.Reason == "" || ci.Cause == "" {
			return fmt.Errorf("connection %d closed with reason %q, cause %q; want %d, with both", ci.ID, ci.Reason, ci.Cause, id)
		}
		return nil
	}
}

// actedOn checks an answer by address: the filter it applied is exactly
// the one sent (admin.md: a script checks that what was acted on is what
// it named), at least one id (none is the API's 404), and one entry per
// id, in the same order.
func actedOn(q listQuery, filter queryFilter, ids []uint64, entryIDs []uint64) error {
	if filter != q.filter() {
		return fmt.Errorf("filter %+v, not the %+v sent", filter, q.filter())
	}
	if len(ids) == 0 || !slices.Equal(ids, entryIDs) {
		return fmt.Errorf("ids %v and entries for %v", ids, entryIDs)
	}
	return nil
}

// targetEndpoints returns the endpoints set and close act on: the one an
// id belongs to, or every one for --remote/--local.
func targetEndpoints(ep *endpointFlags, byID bool) ([]*endpoint, error) {
	if byID {
		e, err := oneEndpoint(ep)
		if err != nil {
			return nil, err
		}
		return []*endpoint{e}, nil
	}
	return ep.endpoints()
}

// edgeAnswer is one endpoint's answer to a set or close.
type edgeAnswer[T any] struct {
	ep     *endpoint
	raw    []byte
	answer T
	err    error
}

// actOnEdges sends the request to every endpoint, one after the other, and
// decodes each answer into T, which must have the fields keys and pass
// check. With several endpoints, each failure but "nothing matched" is
// written to errw as it happens, and the others are still acted on.
func actOnEdges[T any](errw io.Writer, eps []*endpoint, c call, keys []string, check func(*T) error) []edgeAnswer[T] {
	answers := make([]edgeAnswer[T], 0, len(eps))
	for _, e := range eps {
		a := edgeAnswer[T]{ep: e}
		if a.raw, a.err = e.do(c); a.err == nil {
			a.err = e.decode(c, a.raw, &a.answer, keys, func() error { return check(&a.answer) })
		}
		if a.err != nil && len(eps) > 1 && exitStatusOf(a.err) != exitNoMatch {
			fmt.Fprintln(errw, "Error:", oneLine(a.err.Error()))
		}
		answers = append(answers, a)
	}
	return answers
}

// edgesOutcome says, after a set or close on several edges, which edges
// matched and how many connections each, and returns the error the
// command ends with: an edge that failed (exit 3), else none that matched
// (exit 2).
func edgesOutcome[T any](answers []edgeAnswer[T], count func(T) int, verb string, f filterFlags) (summary string, err error) {
	var matched, none []string
	failed, total := 0, 0
	for _, a := range answers {
		switch {
		case a.err == nil:
			n := count(a.answer)
			total += n
			matched = append(matched, fmt.Sprintf("%d on %s", n, a.ep.label))
		case exitStatusOf(a.err) == exitNoMatch:
			none = append(none, a.ep.label)
		default:
			failed++
		}
	}
	summary = fmt.Sprintf("%d %s %s (%s)", total, plural(total, "connection"), verb, f)
	if len(matched) > 0 {
		summary += ": " + strings.Join(matched, ", ")
	}
	if len(none) > 0 {
		summary += "; none matched on " + strings.Join(none, ", ")
	}
	switch {
	case failed > 0:
		err = withStatus(exitUnreachable, fmt.Errorf("tcpops: %d of %d edges failed", failed, len(answers)))
	case len(matched) == 0:
		err = withStatus(exitNoMatch, fmt.Errorf("tcpops: no connection matches %s on any of the %d edges", f, len(answers)))
	}
	return summary, err
}

// writeEdgesJSON writes the answers of several edges as one JSON object:
// {"edges": [{"edge": url, "answer": ...} or {"edge": url, "error": ...}]}.
func writeEdgesJSON[T any](w io.Writer, answers []edgeAnswer[T]) error {
	type edgeJSON struct {
		Edge   string          `json:"edge"`
		Answer json.RawMessage `json:"answer,omitempty"`
		Error  string          `json:"error,omitempty"`
	}
	out := struct {
		Edges []edgeJSON `json:"edges"`
	}{Edges: []edgeJSON{}}
	for _, a := range answers {
		e := edgeJSON{Edge: a.ep.label}
		if a.err != nil {
			e.Error = oneLine(a.err.Error())
		} else {
			e.Answer = termsafe.JSON(bytes.TrimSpace(a.raw))
		}
		out.Edges = append(out.Edges, e)
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// setFlags are the flags of `caddy tcpops set`.
type setFlags struct {
	filter      filterFlags
	keepalive   string
	userTimeout string
	lifetime    string
	maxLifetime string
	jitter      string
	grace       string
	statsPeriod string
	events      string
	json        bool
}

// patchBody is the PATCH body set sends: every duration a string in the
// Caddyfile's form, since a JSON number would be nanoseconds.
type patchBody struct {
	Keepalive   *patchKeepalive `json:"keepalive,omitempty"`
	UserTimeout string          `json:"user_timeout,omitempty"`
	Lifetime    string          `json:"lifetime,omitempty"`
	MaxLifetime string          `json:"max_lifetime,omitempty"`
	Jitter      string          `json:"max_lifetime_jitter,omitempty"`
	Grace       string          `json:"max_lifetime_grace,omitempty"`
	StatsPeriod string          `json:"stats_period,omitempty"`
	Events      *bool           `json:"events,omitempty"`
}

type patchKeepalive struct {
	Off      bool   `json:"off,omitempty"`
	Idle     string `json:"idle,omitempty"`
	Count    int    `json:"count,omitempty"`
	Interval string `json:"interval,omitempty"`
}

// patchedAnswer is the answer to a PATCH of the collection (admin.go's
// patchedList).
type patchedAnswer struct {
	Filter      queryFilter      `json:"filter"`
	IDs         []uint64         `json:"ids"`
	Connections []connectionInfo `json:"connections"`
}

// closedAnswer is the answer to a DELETE of the collection (admin.go's
// closedList).
type closedAnswer struct {
	Filter queryFilter  `json:"filter"`
	IDs    []uint64     `json:"ids"`
	Closed []closedInfo `json:"closed"`
}

func setCommand(ep *endpointFlags) *cobra.Command {
	var f setFlags
	cmd := &cobra.Command{
		Use:   "set <id>|--remote <ip[:port]> [--keepalive <idle>,<count>,<interval>|on|off] [--user-timeout <d>|off] [--lifetime <d>|off] [--max-lifetime <d>|off] [--max-lifetime-jitter <percent>] [--max-lifetime-grace <d>|off] [--stats-period <d>|off] [--events on|off] [--json]",
		Short: "Changes a connection's tcpops options",
		Long: `
Changes the tcpops options of one connection, or with --remote and --local
of every connection that matches, exactly as a later tcpops in a route
would: options not given keep their value; the socket options are set at
once; a lifetime runs from now (Kamailio's tcp_set_connection_lifetime).
Prints the connections after the change, read back from the socket.

Values take the Caddyfile's forms and ranges, and a bad one is refused
before anything is sent: durations as 90s, 1m30s or 1d, a bare integer
being seconds; keepalive as idle,count,interval (Kamailio's order), on or
off; off removes a user timeout, lifetime, max_lifetime,
max_lifetime_grace or stats_period; a jitter is a percentage (10% or 10). Every field of
the API's PATCH body has its flag.

A set that matches no connection is an error (exit status 2): nothing was
changed. With several --url, --remote/--local act on every edge; the last
line says how many connections each edge changed and which had none.`,
		Example: `  caddy tcpops set 4711 --lifetime 10m
  caddy tcpops set 4711 --keepalive 30,3,10 --user-timeout 40s
  caddy tcpops set 4711 --keepalive off --lifetime off
  caddy tcpops set --remote 192.0.2.7 --max-lifetime 1h --events on`,
		RunE: commandStatus(func(cmd *cobra.Command, args []string) error {
			return runSet(cmd, ep, args, &f)
		}),
	}
	f.filter.add(cmd, "Every connection")
	fl := cmd.Flags()
	fl.StringVar(&f.keepalive, "keepalive", "", "Keepalive: <idle>,<count>,<interval> (as 30,3,10 or 30s,3,10s), on or off")
	fl.StringVar(&f.userTimeout, "user-timeout", "", "TCP_USER_TIMEOUT: a duration (whole ms) or off")
	fl.StringVar(&f.lifetime, "lifetime", "", "Inactivity lifetime, from now: a duration or off")
	fl.StringVar(&f.maxLifetime, "max-lifetime", "", "Cap on the connection's age: a duration or off")
	fl.StringVar(&f.jitter, "max-lifetime-jitter", "", "Draw the connection's max_lifetime again, up to this share below it: a percentage, 0% to 100%")
	fl.StringVar(&f.grace, "max-lifetime-grace", "", "On an HTTP connection past its max_lifetime, how long requests in flight may run: a duration or off")
	fl.StringVar(&f.statsPeriod, "stats-period", "", "Count the connection in the TCP statistics while it lives, this often: whole seconds, or off")
	fl.StringVar(&f.events, "events", "", "The tcp_closed, tcp_timeout and tcp_reset events: on or off")
	fl.BoolVar(&f.json, "json", false, "Print the API's JSON as it is")
	return cmd
}

func runSet(cmd *cobra.Command, ep *endpointFlags, args []string, f *setFlags) error {
	body, err := f.patchBody(cmd)
	if err != nil {
		return err
	}
	c, id, q, err := target(http.MethodPatch, args, f.filter, body)
	if err != nil {
		return err
	}
	byID := len(args) == 1
	eps, err := targetEndpoints(ep, byID)
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	if byID {
		a := actOnEdges(cmd.ErrOrStderr(), eps, c, connKeys, func(ci *connectionInfo) error { return isConn(ci, id)() })[0]
		if a.err != nil {
			return a.err
		}
		return printChanged(w, f.json, a.raw, []connectionInfo{a.answer}, nil, "")
	}
	answers := actOnEdges(cmd.ErrOrStderr(), eps, c, []string{"filter", "ids", "connections"}, func(a *patchedAnswer) error {
		ids := make([]uint64, 0, len(a.Connections))
		for _, ci := range a.Connections {
			ids = append(ids, ci.ID)
		}
		return actedOn(q, a.Filter, a.IDs, ids)
	})
	if len(eps) == 1 {
		a := answers[0]
		if a.err != nil {
			return a.err
		}
		return printChanged(w, f.json, a.raw, a.answer.Connections, nil, "")
	}
	summary, err := edgesOutcome(answers, func(a patchedAnswer) int { return len(a.Connections) }, "changed", f.filter)
	if f.json {
		if jerr := writeEdgesJSON(w, answers); jerr != nil {
			return jerr
		}
		return err
	}
	if exitStatusOf(err) == exitNoMatch {
		return err // the error says it all, as with one edge
	}
	var conns []connectionInfo
	var edges []string
	for _, a := range answers {
		if a.err == nil {
			conns = append(conns, a.answer.Connections...)
			for range a.answer.Connections {
				edges = append(edges, a.ep.label)
			}
		}
	}
	if perr := printChanged(w, false, nil, conns, edges, summary); perr != nil {
		return perr
	}
	return err
}

// printChanged prints what a set changed: the answer as it is, or a table
// and a last line (summary, or the count).
func printChanged(w io.Writer, asJSON bool, raw []byte, conns []connectionInfo, edges []string, summary string) error {
	if asJSON {
		_, err := w.Write(termsafe.JSON(raw))
		return err
	}
	if err := writeConnTable(w, conns, edges); err != nil {
		return err
	}
	if summary == "" {
		summary = fmt.Sprintf("%d %s changed", len(conns), plural(len(conns), "connection"))
	}
	_, err := fmt.Fprintln(w, summary)
	return err
}

func closeCommand(ep *endpointFlags) *cobra.Command {
	var (
		filter filterFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "close <id>|--remote <ip[:port]> [--local <ip[:port]>] [--json]",
		Short: "Closes connections now",
		Long: `
Closes one connection, or with --remote and --local every connection that
matches, now: Kamailio's tcp_close_connection, HAProxy's shutdown session.
The client sees the close; a proxy in the route then half-closes its
upstream. The end is recorded with reason closed and cause admin. Prints
what it closed.

A close that matches no connection is an error (exit status 2). With
several --url, --remote/--local close on every edge; the last line says
how many each edge closed and which had none.`,
		Example: `  caddy tcpops close 4711
  caddy tcpops close --remote 192.0.2.7:5060`,
		RunE: commandStatus(func(cmd *cobra.Command, args []string) error {
			c, id, q, err := target(http.MethodDelete, args, filter, nil)
			if err != nil {
				return err
			}
			byID := len(args) == 1
			eps, err := targetEndpoints(ep, byID)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if byID {
				a := actOnEdges(cmd.ErrOrStderr(), eps, c, []string{"id", "reason", "cause"}, func(ci *closedInfo) error { return isClosed(ci, id)() })[0]
				if a.err != nil {
					return a.err
				}
				return printClosed(w, asJSON, a.raw, []closedInfo{a.answer}, "", "")
			}
			answers := actOnEdges(cmd.ErrOrStderr(), eps, c, []string{"filter", "ids", "closed"}, func(a *closedAnswer) error {
				ids := make([]uint64, 0, len(a.Closed))
				for _, ci := range a.Closed {
					if err := isClosed(&ci, ci.ID)(); err != nil {
						return err
					}
					ids = append(ids, ci.ID)
				}
				return actedOn(q, a.Filter, a.IDs, ids)
			})
			if len(eps) == 1 {
				a := answers[0]
				if a.err != nil {
					return a.err
				}
				summary := fmt.Sprintf("%d %s closed (%s)", len(a.answer.Closed), plural(len(a.answer.Closed), "connection"), filter)
				return printClosed(w, asJSON, a.raw, a.answer.Closed, "", summary)
			}
			summary, err := edgesOutcome(answers, func(a closedAnswer) int { return len(a.Closed) }, "closed", filter)
			if asJSON {
				if jerr := writeEdgesJSON(w, answers); jerr != nil {
					return jerr
				}
				return err
			}
			if exitStatusOf(err) == exitNoMatch {
				return err // the error says it all, as with one edge
			}
			for _, a := range answers {
				if a.err == nil {
					if perr := printClosed(w, false, nil, a.answer.Closed, a.ep.label, ""); perr != nil {
						return perr
					}
				}
			}
			if _, perr := fmt.Fprintln(w, summary); perr != nil {
				return perr
			}
			return err
		}),
	}
	filter.add(cmd, "Every connection")
	cmd.Flags().BoolVar(&asJSON, "json", false, "Print the API's JSON as it is")
	return cmd
}

// printClosed prints what a close closed, one line each (naming the edge,
// if given), and the summary, if any.
func printClosed(w io.Writer, asJSON bool, raw []byte, closed []closedInfo, edge, summary string) error {
	if asJSON {
		_, err := w.Write(termsafe.JSON(raw))
		return err
	}
	on := ""
	if edge != "" {
		on = " on " + edge
	}
	for _, c := range closed {
		if _, err := fmt.Fprintf(w, "closed connection %d%s (reason %s, cause %s)\n", c.ID, on, termsafe.Text(c.Reason), termsafe.Text(c.Cause)); err != nil {
			return err
		}
	}
	if summary == "" {
		return nil
	}
	_, err := fmt.Fprintln(w, summary)
	return err
}

// patchBody checks every option given with the Caddyfile's rules and
// messages and returns the JSON body of the PATCH.
func (f *setFlags) patchBody(cmd *cobra.Command) ([]byte, error) {
	var b patchBody
	given := cmd.Flags().Changed
	var err error
	if given("keepalive") {
		if b.Keepalive, err = keepaliveFlag(f.keepalive); err != nil {
			return nil, err
		}
	}
	if given("user-timeout") {
		if b.UserTimeout, err = durationFlag("user-timeout", "user_timeout", f.userTimeout, checkUserTimeout); err != nil {
			return nil, err
		}
	}
	if given("lifetime") {
		check := func(d time.Duration) error { return checkPositive("lifetime", d) }
		if b.Lifetime, err = durationFlag("lifetime", "lifetime", f.lifetime, check); err != nil {
			return nil, err
		}
	}
	if given("max-lifetime") {
		check := func(d time.Duration) error { return checkPositive("max_lifetime", d) }
		if b.MaxLifetime, err = durationFlag("max-lifetime", "max_lifetime", f.maxLifetime, check); err != nil {
			return nil, err
		}
	}
	if given("max-lifetime-jitter") {
		p, err := parsePercent(f.jitter)
		if err == nil {
			err = checkJitter(p)
		}
		if err != nil {
			return nil, flagError("max-lifetime-jitter", f.jitter, err)
		}
		b.Jitter = Percent(p).String()
	}
	if given("max-lifetime-grace") {
		check := func(d time.Duration) error { return checkPositive("max_lifetime_grace", d) }
		if b.Grace, err = durationFlag("max-lifetime-grace", "max_lifetime_grace", f.grace, check); err != nil {
			return nil, err
		}
	}
	if given("stats-period") {
		if b.StatsPeriod, err = durationFlag("stats-period", "stats_period", f.statsPeriod, checkStatsPeriod); err != nil {
			return nil, err
		}
	}
	if given("events") {
		on := f.events == "on"
		if !on && f.events != "off" {
			return nil, flagError("events", f.events, fmt.Errorf("events %q: want on or off", f.events))
		}
		b.Events = &on
	}
	if b == (patchBody{}) {
		return nil, errors.New("tcpops: nothing to set: give --keepalive, --user-timeout, --lifetime, --max-lifetime, --max-lifetime-jitter, --max-lifetime-grace, --stats-period or --events")
	}
	return json.Marshal(b)
}

// durationFlag parses a duration or "off" as the Caddyfile does and checks
// a duration with check, the Caddyfile's check for the option (field, as
// its messages name it). It returns
// the value as the PATCH body writes it: "off", or a Go duration string,
// which the admin API reads back exactly.
func durationFlag(flag, field, s string, check func(time.Duration) error) (string, error) {
	v, err := parseOptionalDuration(s)
	if err != nil {
		return "", flagError(flag, s, err)
	}
	if v.IsOff() {
		return "off", nil
	}
	// A 0 is a value here, as in the Caddyfile (in JSON it would mean
	// "unchanged"), so it is checked and refused like any value out of range.
	if err := check(v.Duration()); err != nil {
		// The checks add, below a millisecond, a hint for JSON, where a
		// number is nanoseconds; a flag is never a JSON number.
		msg, _, _ := strings.Cut(asWritten(err, field, v.Duration(), s).Error(), "; a JSON number is nanoseconds")
		return "", flagError(flag, s, errors.New(msg))
	}
	return v.Duration().String(), nil
}

// keepaliveFlag parses --keepalive: Kamailio's and the Caddyfile's
// idle,count,interval, or on or off.
func keepaliveFlag(s string) (*patchKeepalive, error) {
	switch s {
	case "on":
		return &patchKeepalive{}, nil
	case "off":
		return &patchKeepalive{Off: true}, nil
	}
	parts := strings.Split(s, ",")
	if len(parts) != 3 {
		return nil, flagError("keepalive", s, errors.New("want <idle>,<count>,<interval> (as 30,3,10 or 30s,3,10s), on or off"))
	}
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	idle, err := keepaliveSecondsFlag("idle", parts[0])
	if err != nil {
		return nil, flagError("keepalive", s, err)
	}
	count, err := strconv.Atoi(parts[1])
	if err != nil {
		return nil, flagError("keepalive", s, fmt.Errorf("keepalive count %q: not a whole number", parts[1]))
	}
	if count == 0 {
		// 0 means "unchanged" to validateKeepaliveCount; given, it is a value.
		count = -1
	}
	if err := validateKeepaliveCount(count); err != nil {
		if count == -1 {
			err = fmt.Errorf("keepalive count 0: must be between %d and %d", minKeepaliveCount, maxKeepaliveCount)
		}
		return nil, flagError("keepalive", s, err)
	}
	interval, err := keepaliveSecondsFlag("interval", parts[2])
	if err != nil {
		return nil, flagError("keepalive", s, err)
	}
	return &patchKeepalive{Idle: idle, Count: count, Interval: interval}, nil
}

// keepaliveSecondsFlag checks a keepalive idle or interval as the Caddyfile
// does and returns it as a Go duration string.
func keepaliveSecondsFlag(field, s string) (string, error) {
	v, err := parseDuration(s)
	if err != nil {
		return "", fmt.Errorf("keepalive %s: %v", field, err)
	}
	if v == 0 {
		return "", fmt.Errorf("keepalive %s %s: must be between %ds and %ds", field, s, minKeepaliveSeconds, maxKeepaliveSeconds)
	}
	if err := validateKeepaliveSeconds(field, Duration(v)); err != nil {
		return "", asWritten(err, "keepalive "+field, v, s)
	}
	return v.String(), nil
}

// exactDuration formats a configured value exactly, as it can be written
// back: "45s", "1m30s", "1h"; time.Duration's String without its trailing
// zero units ("1h0m0s").
func exactDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// humanDuration formats d for a person reading a table: two significant
// units at most, the way an operator says it ("1h2m", "4.2s", "350ms"),
// rounded. time.Duration's own String is exact ("1h2m3.456789s") and too
// wide for a column; the exact values are in --json. Like String and
// exactDuration it stops at hours ("36h", not "1d12h"), so that a line
// that shows a configured value and a time left uses one kind of unit.
func humanDuration(d time.Duration) string { return formatDuration(d, false) }

// leftDuration formats a time left as humanDuration does, but cut down
// instead of rounded: 23h59m45s left is "23h59m", never "24h", and 999ms
// is "999ms", never "1s". A time left shown rounded up would promise more
// time than there is.
func leftDuration(d time.Duration) string { return formatDuration(d, true) }

func formatDuration(d time.Duration, down bool) string {
	if d < 0 {
		// Only a clock step makes a time left or an age negative; show it
		// rather than hide it.
		return "-" + formatDuration(-max(d, -math.MaxInt64), down)
	}
	if d == 0 {
		return "0s"
	}
	round := d.Round
	if down {
		round = d.Truncate
	}
	// Below a minute: one decimal under ten of the unit, whole units up to
	// the next one. Each step rounds at its own precision, and a value that
	// rounds up past the step's end is formatted by the next step, so 999.96ms
	// is "1s", never "1000ms".
	for _, u := range []struct {
		unit time.Duration
		name string
		next time.Duration // where the next unit takes over
	}{
		{time.Nanosecond, "ns", time.Microsecond},
		{time.Microsecond, "µs", time.Millisecond},
		{time.Millisecond, "ms", time.Second},
		{time.Second, "s", time.Minute},
	} {
		if u.unit > time.Nanosecond {
			if r := round(u.unit / 10); r < 10*u.unit {
				return trimPointZero(strconv.FormatFloat(float64(r)/float64(u.unit), 'f', 1, 64)) + u.name
			}
		}
		if r := round(u.unit); r < u.next {
			return strconv.FormatInt(int64(r/u.unit), 10) + u.name
		}
	}
	// From a minute on: the unit and the one below it, rounded to the one
	// below ("1m2s", "1h2m", "36h4m"), the lower one left out when it is 0.
	for _, u := range []struct {
		big, small   time.Duration
		bname, sname string
		next         time.Duration
	}{
		{time.Minute, time.Second, "m", "s", time.Hour},
		{time.Hour, time.Minute, "h", "m", 0},
	} {
		r := round(u.small)
		if u.next != 0 && r >= u.next {
			continue
		}
		s := strconv.FormatInt(int64(r/u.big), 10) + u.bname
		if rest := (r % u.big) / u.small; rest != 0 {
			s += strconv.FormatInt(int64(rest), 10) + u.sname
		}
		return s
	}
	panic("unreachable")
}

// humanBytes formats a byte count in binary units: "0 B", "512 B",
// "1.5 KiB", "3.2 MiB", "120 GiB". One decimal under ten of a unit, whole
// units above, as ls -h and ss do.
func humanBytes(n uint64) string {
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n)
	for i, u := range units {
		v /= 1024
		// Round as the output will, so that 1023.96 KiB becomes "1.0 MiB"
		// and not "1024 KiB".
		if v < 9.95 {
			return trimPointZero(strconv.FormatFloat(v, 'f', 1, 64)) + " " + u
		}
		if v < 1023.5 || i == len(units)-1 {
			return strconv.FormatFloat(v, 'f', 0, 64) + " " + u
		}
	}
	panic("unreachable")
}

// trimPointZero drops a ".0" decimal: "4.0" is "4".
func trimPointZero(s string) string {
	return strings.TrimSuffix(s, ".0")
}

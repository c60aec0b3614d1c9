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
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// init registers `caddy tcpops` the way Caddy's own modules register their
// commands, so that every build with the plugin has it.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:      "tcpops",
		Usage:     "list|show|set|close [<id>] [flags] [--address <interface>] [--config <path> [--adapter <name>]]",
		Short:     "Lists, shows, changes and closes the connections tcpops tracks",
		Long:      commandLong,
		CobraFunc: setUpCommand,
	})
}

var commandLong = `
Lists, shows, changes and closes the TCP connections that tcpops tracks
(layer4.handlers.tcpops, caddy.listeners.tcpops) in a running Caddy, through
its admin API (/tcpops/connections). It is Kamailio's tcp_* conid functions
and HAProxy's "show sess" and "shutdown session", from the shell.

  list    One row per connection: id, remote and local address, age, idle
          time, time left of lifetime and max_lifetime, keepalive as
          idle/count/interval, user timeout, bytes in and out, TCP state.
          --remote and --local filter (IP or IP:port); --limit and --after
          page.
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
integer is seconds. --json prints the admin API's answer as it is, for
scripts. 'caddy help tcpops <subcommand>' says more.

The admin endpoint is found as 'caddy stop' finds it: --address; else the
admin address of the config given with --config (and --adapter); else
` + caddy.DefaultAdminListen + `. A unix socket is written unix//path/to/admin.sock.
`

// setUpCommand gives cmd, Caddy's cobra command for `caddy tcpops`, its
// subcommands and the flags that find the admin endpoint. Caddy calls it
// each time it builds its command tree, so every build gets fresh flag
// values and nothing is shared between runs.
func setUpCommand(cmd *cobra.Command) {
	admin := new(adminFlags)
	pf := cmd.PersistentFlags()
	pf.StringVar(&admin.address, "address", "", "The address of Caddy's admin endpoint, if not the default (unix//path for a unix socket)")
	pf.StringVarP(&admin.config, "config", "c", "", "A config file to read the admin endpoint's address from, if --address is not used")
	pf.StringVarP(&admin.adapter, "adapter", "a", "", "The config adapter to use with --config")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		// cobra suggests a near miss only for the root's subcommands.
		return fmt.Errorf("tcpops: unknown subcommand %q: want list, show, set or close", args[0])
	}
	cmd.AddCommand(listCommand(admin), showCommand(admin), setCommand(admin), closeCommand(admin))
}

// adminFlags are the flags `caddy stop` uses to find the admin endpoint.
type adminFlags struct {
	address, config, adapter string
}

// client finds the admin endpoint as `caddy stop` does: --address, else the
// admin address of the --config file, else Caddy's default.
func (f *adminFlags) client() (*cliClient, error) {
	addr, err := caddycmd.DetermineAdminAPIAddress(f.address, nil, f.config, f.adapter)
	if err != nil {
		return nil, fmt.Errorf("tcpops: finding the admin endpoint: %s", oneLine(err.Error()))
	}
	return &cliClient{addr: addr}, nil
}

// args returns the admin flags as given, for a command line to print.
func (f *adminFlags) args() []string {
	var a []string
	for _, fl := range []struct{ name, v string }{{"address", f.address}, {"config", f.config}, {"adapter", f.adapter}} {
		if fl.v != "" {
			a = append(a, "--"+fl.name, fl.v)
		}
	}
	return a
}

// cliClient sends requests to one admin endpoint through Caddy's own
// client, caddycmd.AdminAPIRequest, which dials unix sockets and sets the
// Origin and Host the admin endpoint insists on.
type cliClient struct {
	addr string
}

// do sends one request and returns the body of a 2xx answer. Every failure
// comes back as one line: the admin API's own message for a 4xx, or what
// went wrong reaching addr.
func (c *cliClient) do(method, uri string, body []byte) ([]byte, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	// One request per command: without "Connection: close" the client's
	// transport, which AdminAPIRequest makes anew each call and never
	// closes, would keep the connection and two goroutines around.
	hdr := http.Header{"Connection": {"close"}}
	resp, err := caddycmd.AdminAPIRequest(c.addr, method, uri, hdr, r)
	if err != nil {
		return nil, c.requestError(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("tcpops: reading the answer of the admin endpoint at %s: %v", c.addr, err)
	}
	return b, nil
}

// requestError turns an error of AdminAPIRequest into one line. It only
// returns strings (made with %v, so there is nothing to unwrap): "caddy
// responded with error: HTTP <status>: <body>" when an answer came, and
// "performing request: <url.Error>" when none did.
func (c *cliClient) requestError(err error) error {
	msg := err.Error()
	if rest, ok := strings.CutPrefix(msg, "caddy responded with error: HTTP "); ok {
		status, body, _ := strings.Cut(rest, ": ")
		var apiErr struct {
			Error string `json:"error"`
		}
		if json.Unmarshal([]byte(body), &apiErr) == nil && apiErr.Error != "" {
			return errors.New(oneLine(apiErr.Error))
		}
		hint := ""
		if status == "404" {
			hint = " (is the tcpops plugin built into that Caddy?)"
		}
		return fmt.Errorf("tcpops: the admin endpoint at %s answered HTTP %s: %s%s", c.addr, status, oneLine(body), hint)
	}
	if rest, ok := strings.CutPrefix(msg, "performing request: "); ok {
		// A url.Error starts with the method and the URL, whose host is a
		// placeholder for a unix socket: name the address instead.
		if _, cause, ok := strings.Cut(rest, `": `); ok {
			rest = cause
		}
		return fmt.Errorf("tcpops: cannot reach Caddy's admin endpoint at %s: %s", c.addr, oneLine(rest))
	}
	return fmt.Errorf("tcpops: admin endpoint %s: %s", c.addr, oneLine(msg))
}

// oneLine folds s onto one line, so that every error is one line on stderr.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
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
	filter   filterFlags
	limit    int
	after    uint64
	json     bool
	limitSet bool
}

func listCommand(admin *adminFlags) *cobra.Command {
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
is a value not set. The last line counts the connections and, when there
are more than --limit, says how to get the next page.

A filter that matches no connection is an error.`,
		Example: `  caddy tcpops list
  caddy tcpops list --remote 192.0.2.7:5060
  caddy tcpops list --local 127.0.0.1:5060 --limit 100 --after 4711
  caddy tcpops list --json | jq '.connections[].id'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f.limitSet = cmd.Flags().Changed("limit")
			return runList(cmd, admin, &f)
		},
	}
	f.filter.add(cmd, "Only connections")
	cmd.Flags().IntVar(&f.limit, "limit", 0, fmt.Sprintf("At most this many connections (1 to %d; the admin API lists %d by default)", maxListLimit, defaultListLimit))
	cmd.Flags().Uint64Var(&f.after, "after", 0, "Only connections with a greater id: the next page")
	cmd.Flags().BoolVar(&f.json, "json", false, "Print the admin API's JSON as it is")
	return cmd
}

func runList(cmd *cobra.Command, admin *adminFlags, f *listFlags) error {
	q, err := f.filter.query()
	if err != nil {
		return err
	}
	if f.limitSet {
		if f.limit < 1 || f.limit > maxListLimit {
			return fmt.Errorf("--limit %d: must be between 1 and %d", f.limit, maxListLimit)
		}
		q.Set("limit", strconv.Itoa(f.limit))
	}
	if f.after != 0 {
		q.Set("after", strconv.FormatUint(f.after, 10))
	}
	body, err := request(admin, http.MethodGet, withQuery(adminConnectionsPath, q), nil)
	if err != nil {
		return err
	}
	var list connectionList
	if err := decodeAnswer(body, &list); err != nil {
		return err
	}
	if list.Total == 0 && f.filter.isSet() {
		return fmt.Errorf("tcpops: no connection matches %s", f.filter)
	}
	w := cmd.OutOrStdout()
	if f.json {
		_, err := w.Write(body)
		return err
	}
	if err := writeConnTable(w, list.Connections); err != nil {
		return err
	}
	n := len(list.Connections)
	switch {
	case list.NextAfter != 0:
		next := append(strings.Fields(cmd.CommandPath()), admin.args()...)
		for _, p := range []struct{ name, v string }{{"remote", f.filter.remote}, {"local", f.filter.local}} {
			if p.v != "" {
				next = append(next, "--"+p.name, p.v)
			}
		}
		next = append(next, "--limit", strconv.Itoa(n), "--after", strconv.FormatUint(list.NextAfter, 10))
		_, err = fmt.Fprintf(w, "%d of %d %s; next page: %s\n", n, list.Total, plural(list.Total, "connection"), shellJoin(next))
	case f.after != 0:
		// The admin API's total counts every match, on every page.
		_, err = fmt.Fprintf(w, "%d of %d %s after id %d\n", n, list.Total, plural(list.Total, "connection"), f.after)
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
		if a != "" && strings.Trim(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:/=@[]%+") == "" {
			out[i] = a
		} else {
			out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return strings.Join(out, " ")
}

// writeConnTable writes one aligned row per connection.
func writeConnTable(w io.Writer, conns []connectionInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tREMOTE\tLOCAL\tAGE\tIDLE\tLIFE_LEFT\tMAX_LEFT\tKEEPALIVE\tUSER_TIMEOUT\tIN\tOUT\tSTATE")
	for _, c := range conns {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			c.ID, c.Remote, c.Local,
			humanDuration(msDuration(c.AgeMs)), humanDuration(msDuration(c.IdleMs)),
			leftColumn(c.LifetimeLeftMs), leftColumn(c.MaxLifetimeLeftMs),
			keepaliveColumn(c), userTimeoutColumn(c),
			humanBytes(c.BytesIn), humanBytes(c.BytesOut),
			stateColumn(c))
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
	return humanDuration(msDuration(*ms))
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

func showCommand(admin *adminFlags) *cobra.Command {
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
last received and sent). The socket is read on Linux only.`,
		Example: `  caddy tcpops show 4711
  caddy tcpops show 4711 --json`,
		Args: exactlyOneID,
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseConnID(args[0])
			if err != nil {
				return err
			}
			var ci connectionInfo
			w := cmd.OutOrStdout()
			if done, err := call(w, admin, http.MethodGet, connPath(id), nil, asJSON, &ci); done || err != nil {
				return err
			}
			return writeConnDetail(w, ci)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "Print the admin API's JSON as it is")
	return cmd
}

func exactlyOneID(_ *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("tcpops: want one connection id; got %d arguments", len(args))
	}
	return nil
}

// writeConnDetail writes every field of c, one per line.
func writeConnDetail(w io.Writer, c connectionInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(k, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t%s\n", k, fmt.Sprintf(format, args...))
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

// target returns the admin API path set and close act on: one connection
// by id, or with --remote/--local the collection, which the API then
// narrows to every live connection that matches.
func target(args []string, f filterFlags) (path string, byID bool, err error) {
	switch {
	case len(args) > 1:
		return "", false, fmt.Errorf("tcpops: want one connection id; got %d arguments", len(args))
	case len(args) == 1 && f.isSet():
		return "", false, fmt.Errorf("tcpops: give a connection id or --remote/--local, not both")
	case len(args) == 1:
		id, err := parseConnID(args[0])
		if err != nil {
			return "", false, err
		}
		return connPath(id), true, nil
	case !f.isSet():
		return "", false, fmt.Errorf("tcpops: give a connection id, or --remote/--local for every connection that matches")
	}
	q, err := f.query()
	if err != nil {
		return "", false, err
	}
	return withQuery(adminConnectionsPath, q), false, nil
}

// setFlags are the flags of `caddy tcpops set`.
type setFlags struct {
	filter      filterFlags
	keepalive   string
	userTimeout string
	lifetime    string
	maxLifetime string
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
	Events      *bool           `json:"events,omitempty"`
}

type patchKeepalive struct {
	Off      bool   `json:"off,omitempty"`
	Idle     string `json:"idle,omitempty"`
	Count    int    `json:"count,omitempty"`
	Interval string `json:"interval,omitempty"`
}

// patchedAnswer is the answer to a PATCH of the collection.
type patchedAnswer struct {
	IDs         []uint64         `json:"ids"`
	Connections []connectionInfo `json:"connections"`
}

// closedAnswer is the answer to a DELETE of the collection.
type closedAnswer struct {
	IDs    []uint64     `json:"ids"`
	Closed []closedInfo `json:"closed"`
}

func setCommand(admin *adminFlags) *cobra.Command {
	var f setFlags
	cmd := &cobra.Command{
		Use:   "set <id>|--remote <ip[:port]> [--keepalive <idle>,<count>,<interval>|on|off] [--user-timeout <d>|off] [--lifetime <d>|off] [--max-lifetime <d>|off] [--events on|off] [--json]",
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
off; off removes a user timeout, lifetime or max_lifetime.`,
		Example: `  caddy tcpops set 4711 --lifetime 10m
  caddy tcpops set 4711 --keepalive 30,3,10 --user-timeout 40s
  caddy tcpops set 4711 --keepalive off --lifetime off
  caddy tcpops set --remote 192.0.2.7 --max-lifetime 1h --events on`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runSet(cmd, admin, args, &f)
		},
	}
	f.filter.add(cmd, "Every connection")
	fl := cmd.Flags()
	fl.StringVar(&f.keepalive, "keepalive", "", "Keepalive: <idle>,<count>,<interval> (as 30,3,10 or 30s,3,10s), on or off")
	fl.StringVar(&f.userTimeout, "user-timeout", "", "TCP_USER_TIMEOUT: a duration (whole ms) or off")
	fl.StringVar(&f.lifetime, "lifetime", "", "Inactivity lifetime, from now: a duration or off")
	fl.StringVar(&f.maxLifetime, "max-lifetime", "", "Cap on the connection's age: a duration or off")
	fl.StringVar(&f.events, "events", "", "The tcp_closed, tcp_timeout and tcp_reset events: on or off")
	fl.BoolVar(&f.json, "json", false, "Print the admin API's JSON as it is")
	return cmd
}

func runSet(cmd *cobra.Command, admin *adminFlags, args []string, f *setFlags) error {
	path, byID, err := target(args, f.filter)
	if err != nil {
		return err
	}
	body, err := f.patchBody(cmd)
	if err != nil {
		return err
	}
	w := cmd.OutOrStdout()
	conns, done, err := callTarget(w, admin, http.MethodPatch, path, body, byID, f.json,
		func(a patchedAnswer) []connectionInfo { return a.Connections })
	if done || err != nil {
		return err
	}
	if err := writeConnTable(w, conns); err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%d %s changed\n", len(conns), plural(len(conns), "connection"))
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
		if b.UserTimeout, err = durationFlag("user-timeout", f.userTimeout, checkUserTimeout); err != nil {
			return nil, err
		}
	}
	if given("lifetime") {
		check := func(d time.Duration) error { return checkPositive("lifetime", d) }
		if b.Lifetime, err = durationFlag("lifetime", f.lifetime, check); err != nil {
			return nil, err
		}
	}
	if given("max-lifetime") {
		check := func(d time.Duration) error { return checkPositive("max_lifetime", d) }
		if b.MaxLifetime, err = durationFlag("max-lifetime", f.maxLifetime, check); err != nil {
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
		return nil, errors.New("tcpops: nothing to set: give --keepalive, --user-timeout, --lifetime, --max-lifetime or --events")
	}
	return json.Marshal(b)
}

// durationFlag parses a duration or "off" as the Caddyfile does and checks
// a duration with check, the Caddyfile's check for the option. It returns
// the value as the PATCH body writes it: "off", or a Go duration string,
// which the admin API reads back exactly.
func durationFlag(flag, s string, check func(time.Duration) error) (string, error) {
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
		msg, _, _ := strings.Cut(err.Error(), "; a JSON number is nanoseconds")
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
		return "", fmt.Errorf("keepalive %s 0s: must be between %ds and %ds", field, minKeepaliveSeconds, maxKeepaliveSeconds)
	}
	if err := validateKeepaliveSeconds(field, Duration(v)); err != nil {
		return "", err
	}
	return v.String(), nil
}

func closeCommand(admin *adminFlags) *cobra.Command {
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
what it closed.`,
		Example: `  caddy tcpops close 4711
  caddy tcpops close --remote 192.0.2.7:5060`,
		RunE: func(cmd *cobra.Command, args []string) error {
			path, byID, err := target(args, filter)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			closed, done, err := callTarget(w, admin, http.MethodDelete, path, nil, byID, asJSON,
				func(a closedAnswer) []closedInfo { return a.Closed })
			if done || err != nil {
				return err
			}
			for _, c := range closed {
				if _, err := fmt.Fprintf(w, "closed connection %d (reason %s, cause %s)\n", c.ID, c.Reason, c.Cause); err != nil {
					return err
				}
			}
			if !byID {
				_, err = fmt.Fprintf(w, "%d %s closed (%s)\n", len(closed), plural(len(closed), "connection"), filter)
			}
			return err
		},
	}
	filter.add(cmd, "Every connection")
	cmd.Flags().BoolVar(&asJSON, "json", false, "Print the admin API's JSON as it is")
	return cmd
}

// request finds the admin endpoint and sends one request to it.
func request(admin *adminFlags, method, uri string, body []byte) ([]byte, error) {
	c, err := admin.client()
	if err != nil {
		return nil, err
	}
	return c.do(method, uri, body)
}

// call sends one request and decodes the answer into v, or with raw
// prints the answer as it is to w instead. It reports done when there is
// nothing left to print: raw, or a failure.
func call(w io.Writer, admin *adminFlags, method, uri string, body []byte, raw bool, v any) (done bool, err error) {
	answer, err := request(admin, method, uri, body)
	if err != nil {
		return true, err
	}
	if raw {
		_, err := w.Write(answer)
		return true, err
	}
	return false, decodeAnswer(answer, v)
}

// callTarget is call for a target: one connection by id, whose answer is
// one item, or the connections that match filters, whose answer is many
// and holds the items.
func callTarget[One, Many any](w io.Writer, admin *adminFlags, method, path string, body []byte, byID, raw bool,
	items func(Many) []One) (list []One, done bool, err error) {
	if byID {
		var one One
		done, err = call(w, admin, method, path, body, raw, &one)
		return []One{one}, done, err
	}
	var many Many
	done, err = call(w, admin, method, path, body, raw, &many)
	return items(many), done, err
}

// decodeAnswer decodes an admin API answer into v.
func decodeAnswer(b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("tcpops: decoding the admin endpoint's answer: %v", err)
	}
	return nil
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
// units at most, the way an operator says it ("1h2m", "4.2s", "350ms").
// time.Duration's own String is exact ("1h2m3.456789s") and too wide for a
// column; the exact values are in --json.
func humanDuration(d time.Duration) string {
	if d < 0 {
		// Only a clock step makes a time left or an age negative; show it
		// rather than hide it.
		return "-" + humanDuration(-max(d, -math.MaxInt64))
	}
	if d == 0 {
		return "0s"
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
			if r := d.Round(u.unit / 10); r < 10*u.unit {
				return trimPointZero(strconv.FormatFloat(float64(r)/float64(u.unit), 'f', 1, 64)) + u.name
			}
		}
		if r := d.Round(u.unit); r < u.next {
			return strconv.FormatInt(int64(r/u.unit), 10) + u.name
		}
	}
	// From a minute on: the unit and the one below it, rounded to the one
	// below ("1m2s", "1h2m", "3d4h"), the lower one left out when it is 0.
	for _, u := range []struct {
		big, small   time.Duration
		bname, sname string
		next         time.Duration
	}{
		{time.Minute, time.Second, "m", "s", time.Hour},
		{time.Hour, time.Minute, "h", "m", 24 * time.Hour},
		{24 * time.Hour, time.Hour, "d", "h", 0},
	} {
		r := d.Round(u.small)
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

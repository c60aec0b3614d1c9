// Command slowsub is Caddy with tcpops, caddy-l4 and a slow events
// subscriber, events.handlers.e2e_slow, for test/e2e's
// TestReloadThenStopSlowSubscriber: standard Caddy has no events handler,
// and the test needs one that takes its time, in a real process that exits
// after Stop.
package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"
	_ "github.com/tcpops/caddy-tcpops"
)

func init() { caddy.RegisterModule(slow{}) }

// slow sleeps Sleep per event, then appends the event's name and conid to
// File, one line each.
type slow struct {
	File  string         `json:"file"`
	Sleep caddy.Duration `json:"sleep"`
}

func (slow) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "events.handlers.e2e_slow", New: func() caddy.Module { return new(slow) }}
}

var mu sync.Mutex

func (s *slow) Handle(_ context.Context, e caddy.Event) error {
	time.Sleep(time.Duration(s.Sleep))
	mu.Lock()
	defer mu.Unlock()
	f, err := os.OpenFile(s.File, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%s %v\n", e.Name(), e.Data["conid"])
	return err
}

var _ caddyevents.Handler = (*slow)(nil)

func main() { caddycmd.Main() }

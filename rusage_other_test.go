//go:build !unix

package tcpops

import (
	"testing"
	"time"
)

// cpuTime needs getrusage, which this platform does not have.
func cpuTime(b *testing.B) time.Duration {
	b.Skip("measures CPU time with getrusage: unix only (rusage_unix_test.go)")
	return 0
}

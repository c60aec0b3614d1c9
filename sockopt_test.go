package tcpops

// sockopts are the options as the kernel reports them for one socket
// (readSockopts: sockopt_linux_test.go, and a skipping stub elsewhere).
type sockopts struct {
	keepalive, idle, count, interval, userTimeout int
}

//go:build !race

package tcpops

// raceEnabled reports whether the race detector is on; see
// TestLayer4ListenerWrapperHandsTrackedConnToHTTP.
const raceEnabled = false

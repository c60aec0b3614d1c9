// Package termsafe makes text that a server sent safe to print on an
// operator's terminal: a control character in an error message or a table
// cell (ESC starts the sequences that retitle a terminal, clear it or
// rewrite what was printed; a tab or newline shifts columns and lines),
// a C1 control (U+009B is CSI to a terminal in UTF-8 mode), a
// bidirectional override (which reorders what is shown), and bytes that
// are not UTF-8 are printed as escapes instead. JSON keeps its meaning:
// the same escapes, written inside its strings, are JSON's own.
package termsafe

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// unsafe reports whether r must not reach a terminal as it is: C0 and C1
// controls, DEL, and the bidirectional formatting characters (Unicode's
// Bidi_Control: U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069).
func unsafe(r rune) bool {
	switch {
	case r < 0x20, r >= 0x7f && r <= 0x9f:
		return true
	case r == 0x061c, r == 0x200e, r == 0x200f, r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true
	}
	return false
}

// Text returns s with every unsafe character written as a Go escape
// (\x1b, \t, \u202e) and every byte that is not UTF-8 as \xNN: what is
// printed is what was sent, and nothing in it acts on the terminal.
func Text(s string) string {
	if !needsEscape(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x80 && unsafe(r):
			fmt.Fprintf(&b, `\x%02x`, r)
		case unsafe(r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

func needsEscape(s string) bool {
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && size <= 1) || unsafe(r) {
			return true
		}
		i += size
	}
	return false
}

// JSON returns the JSON text b with every unsafe character inside its
// strings written as JSON's \uXXXX escape and every byte that is not
// UTF-8 as \ufffd (what encoding/json decodes it to), so that printing it
// cannot act on a terminal and it decodes to the same value. b must be
// valid JSON (json.Valid): there a raw control character can only be the
// whitespace between tokens, which is kept, and the others can only be
// inside a string, where a \u escape means the same.
func JSON(b []byte) []byte {
	if !needsEscape(string(b)) {
		return b
	}
	out := make([]byte, 0, len(b)+16)
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			out = append(out, `\ufffd`...)
		case r == '\t', r == '\n', r == '\r':
			out = append(out, byte(r))
		case unsafe(r):
			out = fmt.Appendf(out, `\u%04x`, r)
		default:
			out = append(out, b[i:i+size]...)
		}
		i += size
	}
	return out
}

// Command pipelint finds shell pipelines whose reader may stop before its
// writer has finished: `cmd | grep -q x`, `cmd | head -1` and their kin.
//
// Under `set -o pipefail` such a pipeline fails by chance. The reader exits
// at its first match or line; if the writer is still writing, its next write
// gets SIGPIPE and it exits with status 141, which pipefail makes the
// pipeline's status. Whether the writer is still writing depends on how its
// output is buffered and how the two are scheduled: .ci/run failed this way
// with exit status 141 in a cold run (issue 30), after
// `caddy list-modules | grep -qx` had matched. Reading the whole output first (`out=$(cmd)` then
// `grep -qx x <<<"$out"`), or testing without a pipe, cannot fail so.
//
// The check is lexical, not a shell parser: it joins continued lines, drops
// comments, respects quotes, and splits at every unquoted `|` or `|&` (not
// `||`), inside command substitutions too. The reader is the first word after
// the pipe, past variable assignments and `command`, `exec`, `env`, `nice`,
// `time`. A line that must keep such a pipeline says so with a trailing
// `# pipelint: ok` comment, which the reviewer then reads.
package main

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// Finding is one pipeline whose reader may stop early.
type Finding struct {
	Line   int    // 1-based line of the pipeline's start in its file
	Reader string // the reader as written, e.g. "grep -qx layer4.handlers.tcpops"
	Why    string // what makes it stop early
}

func (f Finding) String() string {
	return fmt.Sprintf("line %d: `%s` %s: under pipefail the writer's SIGPIPE (exit 141) fails the pipeline by chance; read the whole output first (out=$(cmd); ... <<<\"$out\") or test without a pipe", f.Line, f.Reader, f.Why)
}

// allow is the comment that keeps a line out of the findings.
const allow = "pipelint: ok"

// Check reads a shell script and returns its early-stopping pipelines, in
// line order. Only a read error is an error; text that is not valid shell is
// checked as far as it can be.
func Check(r io.Reader) ([]Finding, error) {
	var out []Finding
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	var (
		logical   strings.Builder // the command so far, continued lines joined
		start     int             // its first line
		n         int
		allowed   bool
		heredocTo string // the word that ends the here-document being skipped
	)
	for sc.Scan() {
		n++
		line := sc.Text()
		if heredocTo != "" {
			// A here-document's body is data, not commands.
			if strings.TrimLeft(line, "\t") == heredocTo {
				heredocTo = ""
			}
			continue
		}
		if logical.Len() == 0 {
			start = n
		}
		code, comment := splitComment(line)
		if strings.Contains(comment, allow) {
			allowed = true
		}
		trimmed := strings.TrimRight(code, " \t")
		// A line ending in \, | or && / || goes on on the next line; so does
		// one inside an open quote or $( ).
		if cont, ok := strings.CutSuffix(trimmed, `\`); ok {
			logical.WriteString(cont)
			logical.WriteByte(' ')
			continue
		}
		logical.WriteString(code)
		if strings.HasSuffix(trimmed, "|") || strings.HasSuffix(trimmed, "&&") || open(logical.String()) {
			logical.WriteByte(' ')
			continue
		}
		if !allowed {
			for _, f := range checkCommand(logical.String()) {
				f.Line = start
				out = append(out, f)
			}
		}
		heredocTo = heredoc(logical.String())
		logical.Reset()
		allowed = false
	}
	if err := sc.Err(); err != nil {
		return out, fmt.Errorf("pipelint: reading: %w", err)
	}
	if logical.Len() > 0 && !allowed {
		for _, f := range checkCommand(logical.String()) {
			f.Line = start
			out = append(out, f)
		}
	}
	return out, nil
}

// scanUnquoted calls f with the index of each byte of s that stands
// outside quotes and is not escaped by a backslash, in order; f returns how
// many bytes after it to pass over, or -1 to stop. It returns the quote s
// ends inside, 0 for none. Within double quotes a command substitution is
// not looked into (substitutions does that).
func scanUnquoted(s string, f func(i int) int) (q byte) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case q == '\'':
			if c == '\'' {
				q = 0
			}
		case c == '\\':
			i++
		case q == '"':
			if c == '"' {
				q = 0
			}
		case c == '\'' || c == '"':
			q = c
		default:
			skip := f(i)
			if skip < 0 {
				return q
			}
			i += skip
		}
	}
	return q
}

// splitComment splits a line at its comment: a # at the start of a word,
// outside quotes. A # inside a word ($#, ${x#y}, a#b) is not one.
func splitComment(line string) (code, comment string) {
	at := -1
	scanUnquoted(line, func(i int) int {
		if line[i] == '#' && (i == 0 || strings.IndexByte(" \t;|&(", line[i-1]) >= 0) {
			at = i
			return -1
		}
		return 0
	})
	if at < 0 {
		return line, ""
	}
	return line[:at], line[at:]
}

// open reports whether s ends inside a quote or an unclosed $( or (, so
// that the command goes on on the next line.
func open(s string) bool {
	depth := 0
	q := scanUnquoted(s, func(i int) int {
		switch s[i] {
		case '(':
			depth++
		case ')':
			depth--
		}
		return 0
	})
	return q != 0 || depth > 0
}

var heredocRe = regexp.MustCompile(`<<-?\s*['"]?([A-Za-z_][A-Za-z0-9_]*)['"]?`)

// heredoc returns the word that ends a here-document the command starts,
// or "" (a here-string, <<<, is not one).
func heredoc(s string) string {
	for _, m := range heredocRe.FindAllStringSubmatchIndex(s, -1) {
		if m[0] > 0 && s[m[0]-1] == '<' || strings.HasPrefix(s[m[0]:], "<<<") {
			continue
		}
		return s[m[2]:m[3]]
	}
	return ""
}

// checkCommand returns the findings of one logical command line and of the
// command substitutions in it.
func checkCommand(s string) []Finding {
	var out []Finding
	for _, c := range substitutions(s) {
		out = append(out, checkPipes(c)...)
	}
	return out
}

// substitutions returns s with each command substitution, $( ) or ` `,
// blanked out, followed by the bodies of those substitutions (and of the
// ones nested in them). A substitution's body is a command of its own, with
// quotes of its own, whether or not it stands inside double quotes.
func substitutions(s string) []string {
	outer := []byte(s)
	var inner []string
	var q byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case q == '\'':
			if c == '\'' {
				q = 0
			}
		case c == '\\':
			i++
		case c == '$' && i+1 < len(s) && s[i+1] == '(' && !(i+2 < len(s) && s[i+2] == '('):
			end := closing(s, i+2)
			inner = append(inner, substitutions(s[i+2:end])...)
			for j := i; j < end && j < len(s); j++ {
				outer[j] = ' '
			}
			i = end
		case c == '`':
			j := strings.IndexByte(s[i+1:], '`')
			end := len(s)
			if j >= 0 {
				end = i + 1 + j
			}
			inner = append(inner, substitutions(s[i+1:end])...)
			for k := i; k < end && k < len(s); k++ {
				outer[k] = ' '
			}
			i = end
		case q == '"':
			if c == '"' {
				q = 0
			}
		case c == '\'' || c == '"':
			q = c
		}
	}
	return append([]string{string(outer)}, inner...)
}

// closing returns the index of the ) that closes a $( whose body starts at
// i, or len(s).
func closing(s string, i int) int {
	depth, end := 1, len(s)
	scanUnquoted(s[i:], func(j int) int {
		switch s[i+j] {
		case '(':
			depth++
		case ')':
			if depth--; depth == 0 {
				end = i + j
				return -1
			}
		}
		return 0
	})
	return end
}

// checkPipes returns the findings of one command without substitutions.
func checkPipes(s string) []Finding {
	var out []Finding
	segs := pipeSegments(s)
	for _, seg := range segs[1:] {
		words := fields(seg)
		// The reader's own words end where its command does.
		for i, w := range words {
			if w == ";" || w == "&&" || w == "||" || w == ")" || w == "}" || w == "&" {
				words = words[:i]
				break
			}
		}
		words = skipPrefix(words)
		if len(words) == 0 {
			continue
		}
		if why := stopsEarly(words); why != "" {
			out = append(out, Finding{Reader: strings.Join(words, " "), Why: why})
		}
	}
	return out
}

// pipeSegments splits s at every unquoted | or |& that is not ||. The first
// segment holds the first writer; each later one starts with a reader.
func pipeSegments(s string) []string {
	var segs []string
	last := 0
	scanUnquoted(s, func(i int) int {
		switch {
		case s[i] != '|':
			return 0
		case i+1 < len(s) && s[i+1] == '|':
			return 1 // ||: an or-list, not a pipe
		case i > 0 && s[i-1] == '>':
			return 0 // >|: a redirection
		}
		segs = append(segs, s[last:i])
		skip := 0
		if i+1 < len(s) && s[i+1] == '&' {
			skip = 1 // |&
		}
		last = i + 1 + skip
		return skip
	})
	return append(segs, s[last:])
}

// fields splits a command into words, unquoting them (quotes removed, their
// content kept), and makes separate words of ; & && || ) } where they stand
// outside quotes.
func fields(s string) []string {
	var words []string
	var w strings.Builder
	inWord := false
	flush := func() {
		if inWord {
			words = append(words, w.String())
			w.Reset()
			inWord = false
		}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch c {
		case ' ', '\t', '\n':
			flush()
		case '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				j = len(s) - i - 1
			}
			w.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case '"':
			j := i + 1
			for j < len(s) && s[j] != '"' {
				if s[j] == '\\' {
					j++
				}
				j++
			}
			w.WriteString(s[i+1 : min(j, len(s))])
			i = j
			inWord = true
		case '\\':
			if i+1 < len(s) {
				w.WriteByte(s[i+1])
				i++
			}
			inWord = true
		case ';', ')', '}':
			flush()
			words = append(words, string(c))
		case '&':
			flush()
			if i+1 < len(s) && s[i+1] == '&' {
				words = append(words, "&&")
				i++
			} else {
				words = append(words, "&")
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	flush()
	return words
}

var assignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// skipPrefix drops what stands before the reader's command name: variable
// assignments, and the commands that run another (command, exec, env, nice,
// time, with their options).
func skipPrefix(words []string) []string {
	for len(words) > 0 {
		switch w := words[0]; {
		case assignment.MatchString(w), w == "!", w == "{", w == "(":
			words = words[1:]
		case w == "command" || w == "exec" || w == "env" || w == "nice" || w == "time" || w == "stdbuf":
			words = words[1:]
			for len(words) > 0 && (strings.HasPrefix(words[0], "-") || assignment.MatchString(words[0])) {
				opt := words[0]
				words = words[1:]
				// nice -n 19, stdbuf -o L: an option with its value apart.
				if (opt == "-n" || opt == "-o" || opt == "-i" || opt == "-e") && len(words) > 0 {
					words = words[1:]
				}
			}
		default:
			return words
		}
	}
	return words
}

// stopsEarly says why a reader may exit before reading all its input, or
// returns "".
func stopsEarly(words []string) string {
	name := words[0]
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	args := words[1:]
	switch name {
	case "head":
		return "stops after its first lines"
	case "grep", "egrep", "fgrep", "zgrep":
		return grepStops(args)
	case "sed":
		for _, a := range args {
			if sedQuits.MatchString(a) {
				return "quits (sed's q)"
			}
		}
	case "awk", "gawk", "mawk":
		for _, a := range args {
			if awkExits.MatchString(a) {
				return "may exit (awk's exit)"
			}
		}
	}
	return ""
}

var (
	// sedQuits matches a sed script with a q or Q command: at the script's
	// start, or after an address, ; { or space.
	sedQuits = regexp.MustCompile(`(^|[;{}\s0-9$/])[qQ]([0-9\s;}]|$)`)
	awkExits = regexp.MustCompile(`\bexit\b`)
)

// grepStops reports whether grep's options make it stop at a match: -q
// (--quiet, --silent), -m N (--max-count), -l and -L (--files-with-matches,
// --files-without-match), alone or in a cluster (-qx, -Eqm1).
func grepStops(args []string) string {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return ""
		case a == "--quiet" || a == "--silent":
			return "exits at its first match (" + a + ")"
		case strings.HasPrefix(a, "--max-count"):
			return "stops after " + a
		case a == "--files-with-matches" || a == "--files-without-match":
			return "stops at its first match (" + a + ")"
		case strings.HasPrefix(a, "--"):
		case strings.HasPrefix(a, "-") && len(a) > 1:
		cluster:
			for j := 1; j < len(a); j++ {
				switch a[j] {
				case 'q':
					return "exits at its first match (-q)"
				case 'l', 'L':
					return "stops at its first match (-" + string(a[j]) + ")"
				case 'm':
					return "stops after -m"
				case 'A', 'B', 'C', 'e', 'f', 'd', 'D':
					// An option with a value ends the cluster: the value is
					// the cluster's rest, or the next word (-e -q is a
					// pattern, not -q).
					if j == len(a)-1 {
						i++
					}
					break cluster
				}
			}
		}
	}
	return ""
}

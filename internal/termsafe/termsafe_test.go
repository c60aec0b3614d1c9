package termsafe

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"unicode/utf8"
)

func TestText(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"plain text, ünïcode ✓", "plain text, ünïcode ✓"},
		{"\x1b]0;PWNED\x07\x1b[2J", `\x1b]0;PWNED\x07\x1b[2J`},
		{"a\tb\nc\rd", `a\tb\nc\rd`},
		{"del\x7f", `del\x7f`},
		{"csi\u009b2J", `csi\u009b2J`},
		{"evil\u202etxt.exe", `evil\u202etxt.exe`},
		{"bad \xff\xfe utf-8", `bad \xff\xfe utf-8`},
		{"", ""},
	} {
		if got := Text(tc.in); got != tc.want {
			t.Errorf("Text(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"a": "plain ✓"}`, `{"a": "plain ✓"}`},
		{"{\"a\":\"x\x7fy\u009b\u202e\"}\n", `{"a":"x\u007fy\u009b\u202e"}` + "\n"},
		{"{\n\t\"a\": \"\xff\"\r\n}", "{\n\t\"a\": \"\\ufffd\"\r\n}"},
		{`{"error":"\u001b]0;PWNED\u0007"}`, `{"error":"\u001b]0;PWNED\u0007"}`},
	} {
		got := JSON([]byte(tc.in))
		if string(got) != tc.want {
			t.Errorf("JSON(%q) = %q, want %q", tc.in, got, tc.want)
		}
		checkJSON(t, []byte(tc.in), got)
	}
}

// checkJSON fails unless out, JSON's answer for the valid JSON in, is
// valid JSON that decodes to what in decodes to, with nothing unsafe.
func checkJSON(t *testing.T, in, out []byte) {
	t.Helper()
	var a, b any
	if err := json.Unmarshal(in, &a); err != nil {
		t.Fatalf("input %q: %v", in, err)
	}
	if err := json.Unmarshal(out, &b); err != nil {
		t.Fatalf("JSON(%q) = %q: not JSON: %v", in, out, err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("JSON(%q) = %q decodes to %v, not %v", in, out, b, a)
	}
	if !utf8.Valid(out) {
		t.Fatalf("JSON(%q) = %q: not UTF-8", in, out)
	}
	for _, r := range string(bytes.TrimSpace(out)) {
		if unsafe(r) && r != '\n' && r != '\t' && r != '\r' {
			t.Fatalf("JSON(%q) = %q: %U left in it", in, out, r)
		}
	}
}

// FuzzJSON: whatever valid JSON a server sends, JSON's answer is valid
// JSON of the same value with nothing unsafe in it, and Text's has no
// unsafe character and no invalid UTF-8.
func FuzzJSON(f *testing.F) {
	for _, s := range []string{`{"a":"b"}`, "[\"\x7f\u009b\u202e\"]", "\"\xff\"", `{"error":"\u001b[2J"}`, "1", "null"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		txt := Text(string(b))
		if !utf8.ValidString(txt) {
			t.Fatalf("Text(%q) = %q: not UTF-8", b, txt)
		}
		for _, r := range txt {
			if unsafe(r) {
				t.Fatalf("Text(%q) = %q: %U left in it", b, txt, r)
			}
		}
		if json.Valid(b) {
			checkJSON(t, b, JSON(b))
		}
	})
}

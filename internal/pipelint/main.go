package main

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// usage is printed for -h and for a bad argument.
const usage = `usage: pipelint [FILE|DIR ...]

Lists the shell pipelines whose reader may stop before its writer is done
(grep -q, grep -m, head, ...), which fail by chance under pipefail. A DIR is
searched for shell scripts (*.sh, or a #! line naming sh or bash). With no
argument it checks this repository's .ci, test and bench. Exit status 1 if
it found one, 2 on an error.`

func main() {
	args := os.Args[1:]
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Println(usage)
		return
	}
	if len(args) == 0 {
		args = []string{".ci", "test", "bench"}
	}
	found, err := run(args, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pipelint:", err)
		os.Exit(2)
	}
	if found > 0 {
		os.Exit(1)
	}
}

// run checks the scripts named or found under args, prints each finding
// as FILE:LINE: ..., and returns how many it found.
func run(args []string, w *os.File) (int, error) {
	found := 0
	for _, arg := range args {
		files, err := scripts(arg)
		if err != nil {
			return found, err
		}
		for _, name := range files {
			f, err := os.Open(name)
			if err != nil {
				return found, err
			}
			findings, err := Check(f)
			f.Close()
			if err != nil {
				return found, fmt.Errorf("%s: %w", name, err)
			}
			for _, fd := range findings {
				fmt.Fprintf(w, "%s:%s\n", name, strings.TrimPrefix(fd.String(), "line "))
			}
			found += len(findings)
		}
	}
	return found, nil
}

// scripts returns path itself if it is a file, or the shell scripts under
// it if it is a directory.
func scripts(path string) ([]string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return []string{path}, nil
	}
	var out []string
	err = filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if isScript(p) {
			out = append(out, p)
		}
		return nil
	})
	return out, err
}

// isScript reports whether the file is a shell script: named *.sh, or
// starting with a #! line that names sh or bash.
func isScript(p string) bool {
	if strings.HasSuffix(p, ".sh") {
		return true
	}
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	head := make([]byte, 128)
	n, _ := f.Read(head)
	line, _, _ := strings.Cut(string(head[:n]), "\n")
	if !strings.HasPrefix(line, "#!") {
		return false
	}
	return strings.HasSuffix(line, "/sh") || strings.HasSuffix(line, "bash") || strings.Contains(line, "bash ") || strings.Contains(line, "/sh ")
}

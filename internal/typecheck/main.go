// Command typecheck type-checks packages for the GOOS and GOARCH in its
// environment from source, as the compiler's front end does, without
// compiling anything: .ci/run uses it to prove that the plugin compiles on
// platforms other than the one CI builds for, for a small part of the cost
// of cross-compiling its ~1,000 dependencies.
//
//	GOOS=darwin GOARCH=arm64 go run ./internal/typecheck .
//	GOOS=windows go run ./internal/typecheck -test ./...
//
// The files of each package are the ones `go list` selects for that
// platform (build tags, _GOOS.go names, cgo off as in any cross build). The
// named packages are checked in full, with the language version of their
// module; their dependencies only as far as their API goes (function bodies
// are skipped), which is all the named packages can see of them. With
// -test, the named packages' tests are checked in full too (as go vet
// does): each package with its _test.go files, and its external test
// package. It prints each error and exits 1 if there was any.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// listed is what `go list -deps -json` says of one package.
type listed struct {
	ImportPath string
	Dir        string
	GoFiles    []string
	ImportMap  map[string]string
	Imports    []string
	DepOnly    bool
	Module     *struct{ GoVersion string }
	Error      *struct{ Err string }
}

// pkg is a package being checked; done is closed once types is set.
type pkg struct {
	listed
	types *types.Package
	errs  []error
	done  chan struct{}
}

func main() {
	tests := flag.Bool("test", false, "check the named packages' tests too")
	flag.Parse()
	args := []string{"list", "-deps", "-json=ImportPath,Dir,GoFiles,ImportMap,Imports,DepOnly,Module,Error"}
	if *tests {
		args = append(args, "-test")
	}
	args = append(args, flag.Args()...)
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		fmt.Fprintf(os.Stderr, "typecheck: go list: %v\n", err)
		os.Exit(1)
	}
	pkgs := map[string]*pkg{}
	var order []*pkg // dependencies first, as go list -deps prints them
	for dec := json.NewDecoder(bytes.NewReader(out)); ; {
		p := &pkg{done: make(chan struct{})}
		if err := dec.Decode(&p.listed); err == io.EOF {
			break
		} else if err != nil {
			fmt.Fprintf(os.Stderr, "typecheck: reading go list: %v\n", err)
			os.Exit(1)
		}
		if strings.HasSuffix(p.ImportPath, ".test") {
			// The generated main of a test binary (-test): its one
			// file is in the build cache and is the go command's own.
			continue
		}
		pkgs[p.ImportPath] = p
		order = append(order, p)
	}

	goos, goarch := goEnv("GOOS"), goEnv("GOARCH")
	fset := token.NewFileSet()
	sizes := types.SizesFor("gc", goarch)
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for _, p := range order {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(p.done)
			for _, imp := range p.Imports {
				if dep := pkgs[p.resolve(imp)]; dep != nil {
					<-dep.done
				}
			}
			sem <- struct{}{}
			defer func() { <-sem }()
			p.check(fset, sizes, pkgs)
		}()
	}
	wg.Wait()

	failed := false
	for _, p := range order {
		for _, err := range p.errs {
			fmt.Fprintln(os.Stderr, err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
	named := 0
	for _, p := range order {
		if !p.DepOnly {
			named++
		}
	}
	fmt.Printf("%s/%s: %d packages type-check, the %d named in full\n", goos, goarch, len(order), named)
}

// resolve returns the package path an import in p's source refers to.
func (p *pkg) resolve(imp string) string {
	if r, ok := p.ImportMap[imp]; ok {
		return r
	}
	return imp
}

// check parses p's files and type-checks them against its dependencies.
func (p *pkg) check(fset *token.FileSet, sizes types.Sizes, pkgs map[string]*pkg) {
	if p.Error != nil {
		p.errs = append(p.errs, fmt.Errorf("%s: %s", p.ImportPath, p.Error.Err))
		return
	}
	if p.ImportPath == "unsafe" {
		p.types = types.Unsafe
		return
	}
	var files []*ast.File
	for _, name := range p.GoFiles {
		f, err := parser.ParseFile(fset, filepath.Join(p.Dir, name), nil, parser.SkipObjectResolution)
		if err != nil {
			p.errs = append(p.errs, err)
			return
		}
		files = append(files, f)
	}
	conf := types.Config{
		Importer:         importerFunc(func(path string) (*types.Package, error) { return p.imported(path, pkgs) }),
		Sizes:            sizes,
		IgnoreFuncBodies: p.DepOnly,
		Error: func(err error) {
			if len(p.errs) < 10 {
				p.errs = append(p.errs, err)
			}
		},
	}
	if p.Module != nil && p.Module.GoVersion != "" {
		conf.GoVersion = "go" + p.Module.GoVersion
	}
	p.types, _ = conf.Check(p.ImportPath, fset, files, nil)
}

// imported returns the checked package that path, imported by p, refers to.
func (p *pkg) imported(path string, pkgs map[string]*pkg) (*types.Package, error) {
	dep := pkgs[p.resolve(path)]
	if dep == nil || dep.types == nil {
		return nil, fmt.Errorf("%s: import %q: not type-checked", p.ImportPath, path)
	}
	return dep.types, nil
}

type importerFunc func(path string) (*types.Package, error)

func (f importerFunc) Import(path string) (*types.Package, error) { return f(path) }

// goEnv returns the go command's value of an environment setting.
func goEnv(name string) string {
	out, err := exec.Command("go", "env", name).Output()
	if err != nil {
		fmt.Fprintf(os.Stderr, "typecheck: go env %s: %v\n", name, err)
		os.Exit(1)
	}
	return string(bytes.TrimSpace(out))
}

package vm

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

// Report turns the boot's results into subtests of t: one per package
// (named by its path, so `go test -v` shows
// TestKernelSuite/6.12/pkg/crypto/wireguard/TestKernelDevice), below it one per
// test the guest ran, nested like the guest's subtests, each passing,
// failing or skipping as it did in the guest, with its output.
//
// t fails when Problems reports anything (no boot, timeout, panic, a module
// that did not load) and a package's subtest fails when PackageProblems
// does (a crash, a MustRun test that skipped).
func (r *Result) Report(t *testing.T) {
	t.Helper()
	t.Logf("VM: booted after %s (guest uptime %s), first test at %s, powered off after %s",
		r.BootTime.Round(time.Millisecond), r.GuestBootUptime, r.FirstTest.Round(time.Millisecond), r.Duration.Round(time.Millisecond))
	if r.Booted {
		for _, name := range r.packages() {
			t.Run(name, func(t *testing.T) { r.reportPackage(t, name) })
		}
	}
	if p := r.Problems(); len(p) > 0 {
		t.Errorf("%s\nkernel console (tail):\n%s", strings.Join(p, "\n"), tail(r.Console, 8<<10))
	}
}

// packages returns the image's packages, those that ran first, in order.
func (r *Result) packages() []string {
	var names []string
	for _, b := range r.Binaries {
		names = append(names, b.Name)
	}
	for _, n := range r.order {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	return names
}

// Problems returns what fails the boot as a whole, apart from the tests'
// own results: the VM did not boot or did not finish (Err: a timeout, a
// kernel panic, qemu failing), a module or the network did not come up.
func (r *Result) Problems() []string {
	var p []string
	if !r.Booted {
		p = append(p, "the VM did not boot to its tests")
	}
	if r.Err != nil {
		p = append(p, r.Err.Error())
	}
	if len(r.ModuleErrors) > 0 {
		p = append(p, "modules failed to load in the VM: "+strings.Join(r.ModuleErrors, ", "))
	}
	if len(r.NetErrors) > 0 {
		p = append(p, "network setup failed in the VM: "+strings.Join(r.NetErrors, ", "))
	}
	return p
}

// PackageResult is one package's run, decoded.
type PackageResult struct {
	// Binary is the raw run; nil if the VM never started it.
	Binary *BinaryResult
	// Tests are the top-level tests.
	Tests []*TestResult
	// Output is what belongs to no test: the summary, a crash.
	Output []string
}

// Package decodes the named package's run (see BinaryResult.Tests).
func (r *Result) Package(ctx context.Context, name string) (*PackageResult, error) {
	pr := &PackageResult{Binary: r.Binary(name)}
	if pr.Binary == nil {
		return pr, nil
	}
	var err error
	pr.Tests, pr.Output, err = pr.Binary.Tests(ctx)
	return pr, err
}

// PackageProblems returns what fails the package apart from its failed
// tests: it did not run or finish, it exited non-zero with no failed test to
// show for it (a crash outside a test, a -test.timeout panic), or a test it
// must run (Test.MustRun) skipped or is missing.
func (r *Result) PackageProblems(name string, pr *PackageResult) []string {
	var p []string
	b := pr.Binary
	if b == nil {
		return []string{fmt.Sprintf("the VM never started %s", name)}
	}
	failed := slices.ContainsFunc(pr.Tests, (*TestResult).failed)
	out := strings.Join(lastLines(pr.Output, 60), "\n")
	switch {
	case !b.Ended:
		p = append(p, fmt.Sprintf("%s did not finish: the VM stopped while it ran\n%s", name, out))
	case b.Exit != 0 && !failed:
		p = append(p, fmt.Sprintf("%s exited with status %d and no failed test:\n%s", name, b.Exit, out))
	case b.Exit == 0 && failed:
		p = append(p, fmt.Sprintf("%s exited 0 although tests failed", name))
	}
	if spec, ok := r.specs[name]; ok {
		byName := map[string]*TestResult{}
		var walk func([]*TestResult)
		walk = func(trs []*TestResult) {
			for _, tr := range trs {
				byName[tr.Name] = tr
				walk(tr.Subtests)
			}
		}
		walk(pr.Tests)
		for _, must := range spec.MustRun {
			switch tr := byName[must]; {
			case tr == nil:
				p = append(p, fmt.Sprintf("%s did not run in the VM; it must", must))
			case tr.Action == "skip":
				p = append(p, fmt.Sprintf("%s skipped in the VM; it must run there", must))
			}
		}
	}
	return p
}

// failed reports whether tr or one of its subtests failed or never ended.
func (tr *TestResult) failed() bool {
	return tr.Action == "fail" || tr.Action == "" || slices.ContainsFunc(tr.Subtests, (*TestResult).failed)
}

func (r *Result) reportPackage(t *testing.T, name string) {
	pr, err := r.Package(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range pr.Tests {
		reportTest(t, "", tr)
	}
	if b := pr.Binary; b != nil {
		t.Logf("%s: exit %d after %s (guest time)", name, b.Exit, b.Elapsed)
	}
	if p := r.PackageProblems(name, pr); len(p) > 0 {
		t.Error(strings.Join(p, "\n"))
	}
}

// reportTest mirrors tr, a test whose parent is named parent ("" for a
// top-level test), as a subtest of t.
func reportTest(t *testing.T, parent string, tr *TestResult) {
	name := tr.Name
	if parent != "" {
		name = strings.TrimPrefix(name, parent+"/") // may hold slashes itself
	}
	t.Run(name, func(t *testing.T) {
		// The guest's own result line ("--- PASS: TestX (1.20s)", with the
		// guest's timing) comes after the subtests, as in the guest.
		var result []string
		w := t.Output()
		for _, l := range tr.Output {
			if isResultLine(l) {
				result = append(result, l)
				continue
			}
			io.WriteString(w, l+"\n")
		}
		for _, st := range tr.Subtests {
			reportTest(t, tr.Name, st)
		}
		for _, l := range result {
			io.WriteString(w, "guest: "+strings.TrimSpace(l)+"\n")
		}
		switch tr.Action {
		case "pass":
		case "fail":
			t.Fail()
		case "skip":
			t.SkipNow()
		default:
			t.Errorf("%s did not finish in the VM (the binary crashed or timed out, or the VM stopped)", tr.Name)
		}
	})
}

func isResultLine(s string) bool {
	s = strings.TrimSpace(s)
	return strings.HasPrefix(s, "--- PASS: ") || strings.HasPrefix(s, "--- FAIL: ") || strings.HasPrefix(s, "--- SKIP: ")
}

func lastLines(lines []string, n int) []string {
	if len(lines) > n {
		return lines[len(lines)-n:]
	}
	return lines
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

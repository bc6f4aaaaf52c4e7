package vm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// markerPrefix starts every marker line on the results port. A marker is
//
//	@@meshcrypt-vm NONCE boot UPTIME
//	@@meshcrypt-vm NONCE module-error NAME
//	@@meshcrypt-vm NONCE net-error IFACE
//	@@meshcrypt-vm NONCE begin PACKAGE UPTIME
//	@@meshcrypt-vm NONCE end PACKAGE EXIT UPTIME
//	@@meshcrypt-vm NONCE done UPTIME
//
// where NONCE is random per boot (from the kernel command line), so no test
// output can forge a marker, and UPTIME is the guest's /proc/uptime. Between
// begin and end comes the binary's -test.v=test2json output, verbatim.
const markerPrefix = "@@meshcrypt-vm"

// Result is what one boot produced.
type Result struct {
	// Booted: the init script reached the tests (modules loaded).
	Booted bool
	// Done: every test binary ran and the init script finished.
	Done bool
	// Binaries are the test binaries in the order they started.
	Binaries []*BinaryResult
	// ModuleErrors names modules modprobe failed to load; NetErrors the
	// interfaces that could not be configured.
	ModuleErrors, NetErrors []string
	// GuestBootUptime is the guest's uptime when the tests could start.
	GuestBootUptime time.Duration
	// BootTime is the host time from starting qemu to the boot marker;
	// FirstTest to the first begin marker; Duration to qemu's exit.
	BootTime, FirstTest, Duration time.Duration
	// Err is why the boot failed as a whole: qemu could not start or
	// exited with an error, or the timeout or the context ended it.
	Err error
	// Console is the tail of the kernel console (ttyS0).
	Console []byte
	// Nonce is the boot's marker nonce; ParseResults needs it to read a
	// Transcript back.
	Nonce string

	order []string        // the image's packages, in run order
	specs map[string]Test // the image's tests, by package name
}

// BinaryResult is the run of one test binary in the guest.
type BinaryResult struct {
	// Name is the package, as in Image.Tests.
	Name string
	// Ended is false when the VM stopped while the binary ran.
	Ended bool
	// Exit is the binary's exit status (valid when Ended).
	Exit int
	// Elapsed is the binary's run time in guest uptime.
	Elapsed time.Duration
	// Output is the binary's output (-test.v=test2json), carriage returns
	// removed.
	Output []byte
}

// Binary returns the result of the named package's binary, or nil if it
// never started.
func (r *Result) Binary(name string) *BinaryResult {
	for _, b := range r.Binaries {
		if b.Name == name {
			return b
		}
	}
	return nil
}

// resultParser turns the results port's lines into a Result.
type resultParser struct {
	res      *Result
	prefix   string // markerPrefix + " " + nonce + " "
	start    time.Time
	cur      *BinaryResult
	curStart float64
	blank    bool // an empty line is pending: dropped if a marker follows
	progress io.Writer
}

func newResultParser(res *Result, nonce string, start time.Time, progress io.Writer) *resultParser {
	if progress == nil {
		progress = io.Discard
	}
	return &resultParser{res: res, prefix: markerPrefix + " " + nonce + " ", start: start, progress: progress}
}

// line handles one line (without its newline) received at now.
func (p *resultParser) line(s string, now time.Time) {
	s = strings.TrimRight(s, "\r")
	i := strings.Index(s, p.prefix)
	if i < 0 {
		if p.blank {
			p.output("")
			p.blank = false
		}
		if s == "" {
			p.blank = true
			return
		}
		p.output(s)
		if p.cur != nil {
			if t := strings.TrimLeft(s, "\x16"); strings.HasPrefix(t, "--- FAIL") || strings.HasPrefix(t, "FAIL") || strings.HasPrefix(t, "panic:") {
				fmt.Fprintf(p.progress, "vm: %s: %s\n", p.cur.Name, t)
			}
		}
		return
	}
	if i > 0 {
		if p.blank {
			p.output("")
		}
		p.output(s[:i])
	}
	p.blank = false // the newline a marker is printed after
	f := strings.Fields(s[i+len(p.prefix):])
	if len(f) == 0 {
		return
	}
	since := now.Sub(p.start).Round(time.Millisecond)
	switch f[0] {
	case "boot":
		p.res.Booted = true
		p.res.BootTime = now.Sub(p.start)
		if len(f) > 1 {
			p.res.GuestBootUptime = seconds(f[1])
		}
		fmt.Fprintf(p.progress, "vm: booted after %s (guest uptime %s)\n", since, p.res.GuestBootUptime)
	case "module-error":
		if len(f) > 1 {
			p.res.ModuleErrors = append(p.res.ModuleErrors, f[1])
			fmt.Fprintf(p.progress, "vm: modprobe %s failed\n", f[1])
		}
	case "net-error":
		if len(f) > 1 {
			p.res.NetErrors = append(p.res.NetErrors, f[1])
		}
	case "begin":
		if len(f) < 2 {
			return
		}
		if p.res.FirstTest == 0 {
			p.res.FirstTest = now.Sub(p.start)
		}
		p.cur = &BinaryResult{Name: f[1]}
		p.curStart = 0
		if len(f) > 2 {
			p.curStart, _ = strconv.ParseFloat(f[2], 64)
		}
		p.res.Binaries = append(p.res.Binaries, p.cur)
		fmt.Fprintf(p.progress, "vm: %s: running (%s after start)\n", f[1], since)
	case "end":
		if len(f) < 3 || p.cur == nil || p.cur.Name != f[1] {
			return
		}
		p.cur.Ended = true
		p.cur.Exit, _ = strconv.Atoi(f[2])
		if len(f) > 3 {
			if up, err := strconv.ParseFloat(f[3], 64); err == nil {
				p.cur.Elapsed = time.Duration((up - p.curStart) * float64(time.Second)).Round(time.Millisecond)
			}
		}
		fmt.Fprintf(p.progress, "vm: %s: exit %d after %s\n", p.cur.Name, p.cur.Exit, p.cur.Elapsed)
		p.cur = nil
	case "done":
		p.res.Done = true
	}
}

func (p *resultParser) output(s string) {
	if p.cur != nil {
		p.cur.Output = append(p.cur.Output, s...)
		p.cur.Output = append(p.cur.Output, '\n')
	}
}

// read consumes r to its end.
func (p *resultParser) read(r io.Reader, now func() time.Time) error {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		s, err := br.ReadString('\n')
		if s != "" {
			p.line(strings.TrimSuffix(s, "\n"), now())
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// ParseResults parses a recorded results stream (the guest's ttyS1, see
// BootOptions.Transcript) of a boot with the given nonce (Result.Nonce) of
// an image built with tests.
func ParseResults(r io.Reader, nonce string, tests []Test) (*Result, error) {
	res := &Result{Nonce: nonce, specs: map[string]Test{}}
	for _, t := range tests {
		name := packageName(t.Package)
		res.order = append(res.order, name)
		res.specs[name] = t
	}
	p := newResultParser(res, nonce, time.Time{}, nil)
	err := p.read(r, func() time.Time { return time.Time{} })
	return res, err
}

func seconds(s string) time.Duration {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0
	}
	return time.Duration(f * float64(time.Second)).Round(time.Millisecond)
}

// TestResult is one test (or subtest) of a binary, as test2json saw it.
type TestResult struct {
	// Name is the full name, e.g. TestRoutes/install.
	Name string
	// Action is "pass", "fail" or "skip", or "" if the test never finished.
	Action string
	// Elapsed is the test's own report of its duration.
	Elapsed time.Duration
	// Output is the test's output lines, framing lines ("=== RUN") removed.
	Output []string
	// Subtests are the tests it ran with t.Run, in start order.
	Subtests []*TestResult
}

// Tests converts the binary's output with `go tool test2json` into its
// top-level tests, and returns the lines that belong to no test (the
// package summary, a panic outside any test).
func (b *BinaryResult) Tests(ctx context.Context) ([]*TestResult, []string, error) {
	cmd := exec.CommandContext(ctx, goTool(), "tool", "test2json", "-p", b.Name)
	cmd.Stdin = bytes.NewReader(b.Output)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, nil, fmt.Errorf("go tool test2json: %w: %s", err, stderr.Bytes())
	}
	return decodeEvents(out)
}

// event is test2json's output record.
type event struct {
	Action  string
	Test    string
	Elapsed float64
	Output  string
}

// decodeEvents builds the test tree from test2json's JSON lines.
func decodeEvents(data []byte) ([]*TestResult, []string, error) {
	var (
		top    []*TestResult
		byName = map[string]*TestResult{}
		pkgOut []string
	)
	get := func(name string) *TestResult {
		if tr := byName[name]; tr != nil {
			return tr
		}
		tr := &TestResult{Name: name}
		byName[name] = tr
		// The parent is the longest proper prefix at a "/" that is a test:
		// subtest names may contain slashes themselves.
		parent := name
		for {
			i := strings.LastIndexByte(parent, '/')
			if i < 0 {
				top = append(top, tr)
				return tr
			}
			parent = parent[:i]
			if pt := byName[parent]; pt != nil {
				pt.Subtests = append(pt.Subtests, tr)
				return tr
			}
		}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		var e event
		if err := dec.Decode(&e); err == io.EOF {
			break
		} else if err != nil {
			return nil, nil, fmt.Errorf("decode test2json output: %w", err)
		}
		if e.Test == "" {
			if e.Action == "output" {
				pkgOut = append(pkgOut, strings.TrimSuffix(e.Output, "\n"))
			}
			continue
		}
		tr := get(e.Test)
		switch e.Action {
		case "output":
			line := strings.TrimSuffix(e.Output, "\n")
			if isFramingLine(line) {
				continue
			}
			tr.Output = append(tr.Output, line)
			// test2json reports no Elapsed for a test converted from
			// -test.v=test2json output: take it from the result line.
			if name, d, ok := parseResultLine(line); ok {
				if r := byName[name]; r != nil && r.Elapsed == 0 {
					r.Elapsed = d
				}
			}
		case "pass", "fail", "skip":
			tr.Action = e.Action
			if e.Elapsed > 0 {
				tr.Elapsed = time.Duration(e.Elapsed * float64(time.Second)).Round(time.Millisecond)
			}
		}
	}
	return top, pkgOut, nil
}

// parseResultLine reads a test's result line, "--- PASS: TestX/sub (1.25s)", into the
// test's name and duration.
func parseResultLine(s string) (name string, elapsed time.Duration, ok bool) {
	s = strings.TrimSpace(strings.TrimLeft(s, "\x16"))
	for _, p := range []string{"--- PASS: ", "--- FAIL: ", "--- SKIP: "} {
		if rest, found := strings.CutPrefix(s, p); found {
			i := strings.LastIndex(rest, " (")
			if i < 0 || !strings.HasSuffix(rest, ")") {
				return "", 0, false
			}
			d, err := time.ParseDuration(rest[i+2 : len(rest)-1])
			if err != nil {
				return "", 0, false
			}
			return rest[:i], d, true
		}
	}
	return "", 0, false
}

// isFramingLine reports lines that only say a test started, paused or
// continued: the host's own test output says as much.
func isFramingLine(s string) bool {
	for _, p := range []string{"=== RUN", "=== PAUSE", "=== CONT", "=== NAME"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

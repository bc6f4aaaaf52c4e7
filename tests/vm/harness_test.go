package vm_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// harnessTests are the harness's own test packages.
var harnessTests = []vm.Test{
	{Package: "tests/vm/internal/selftest", MustRun: []string{"TestGuest", "TestGuest/esp-gcm", "TestSkip", "TestSubtests/skipped", "TestMissing"}},
	{Package: "./tests/vm/internal/crashtest"},
}

var record = flag.Bool("record", false, "rewrite testdata/selftest.transcript from a fresh boot")

// TestHarness boots the harness's own test packages: one that passes,
// skips, fails on request, runs parallel subtests and checks the guest, and
// one that crashes mid-test. It checks what the host makes of each, the
// checks Report applies (MustRun, crashes), and the guest environment.
func TestHarness(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	img, err := vm.Build(ctx, vm.Options{Tests: harnessTests, HostPrograms: []string{"ip"}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if want := []string{"tests/vm/internal/selftest", "tests/vm/internal/crashtest"}; !slices.Equal(img.Tests, want) {
		t.Errorf("Image.Tests = %q, want %q", img.Tests, want)
	}
	// A server on the host's loopback that the guest reaches at 10.0.2.2.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const body = "hello from the host"
	var requests atomic.Int32
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		io.WriteString(w, body)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	url := fmt.Sprintf("http://%s:%d/", vm.HostAddr, ln.Addr().(*net.TCPAddr).Port)

	var transcript bytes.Buffer
	res, err := vm.Boot(ctx, img, vm.BootOptions{
		Network: true,
		Env: map[string]string{"MESHCRYPT_VM_SELFTEST": "fail", "WITH_QUOTE": "it's",
			"MESHCRYPT_VM_SELFTEST_URL": url, "MESHCRYPT_VM_SELFTEST_BODY": body},
		Transcript: &transcript,
		Progress:   t.Output(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("booted after %s, first test at %s, powered off after %s", res.BootTime, res.FirstTest, res.Duration)
	if p := res.Problems(); len(p) > 0 {
		t.Fatalf("Problems() = %q\nconsole:\n%s", p, res.Console)
	}
	if n := requests.Load(); n != 4 {
		t.Errorf("the host server saw %d requests from the guest, want 4", n)
	}
	if *record {
		data := append([]byte(res.Nonce+"\n"), transcript.Bytes()...)
		if err := os.WriteFile(filepath.Join("testdata", "selftest.transcript"), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	checkSelftest(t, res)
}

// checkSelftest checks a boot of the selftest and crashtest packages (live or
// recorded).
func checkSelftest(t *testing.T, res *vm.Result) {
	t.Helper()
	self, err := res.Package(t.Context(), "tests/vm/internal/selftest")
	if err != nil {
		t.Fatal(err)
	}
	if b := self.Binary; b == nil || !b.Ended || b.Exit != 1 {
		t.Fatalf("selftest binary: %+v, want ended with exit 1", b)
	}
	got := map[string]string{}
	var walk func(trs []*vm.TestResult)
	walk = func(trs []*vm.TestResult) {
		for _, tr := range trs {
			got[tr.Name] = tr.Action
			walk(tr.Subtests)
		}
	}
	walk(self.Tests)
	want := map[string]string{
		"TestPass": "pass", "TestSkip": "skip", "TestFailOnRequest": "fail",
		"TestSubtests": "pass", "TestSubtests/plain": "pass", "TestSubtests/with/slash": "pass",
		"TestSubtests/skipped": "skip", "TestSubtests/parallel": "pass",
		"TestSubtests/parallel/a": "pass", "TestSubtests/parallel/b": "pass",
		"TestGuest": "pass", "TestGuest/mounts": "pass", "TestGuest/modules": "pass",
		"TestGuest/autoload": "pass", "TestGuest/ip-netns": "pass", "TestGuest/esp-gcm": "pass",
		"TestHostNetwork": "pass",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("selftest results (-want +got):\n%s", diff)
		for _, tr := range self.Tests {
			if tr.Name == "TestGuest" {
				t.Logf("TestGuest output:\n%s", strings.Join(allOutput(tr), "\n"))
			}
		}
	}
	for _, tr := range self.Tests {
		if tr.Name == "TestFailOnRequest" && !slices.ContainsFunc(tr.Output, func(s string) bool { return strings.Contains(s, "failing on purpose") }) {
			t.Errorf("TestFailOnRequest output %q lacks its message", tr.Output)
		}
	}
	if !slices.ContainsFunc(self.Output, func(s string) bool { return strings.Contains(s, "selftest: no newline at the end") }) {
		t.Errorf("package output %q lacks the line without a newline", self.Output)
	}
	wantProblems := []string{
		"TestSkip skipped in the VM; it must run there",
		"TestSubtests/skipped skipped in the VM; it must run there",
		"TestMissing did not run in the VM; it must",
	}
	if diff := cmp.Diff(wantProblems, res.PackageProblems("tests/vm/internal/selftest", self)); diff != "" {
		t.Errorf("selftest PackageProblems (-want +got):\n%s", diff)
	}

	crash, err := res.Package(t.Context(), "tests/vm/internal/crashtest")
	if err != nil {
		t.Fatal(err)
	}
	if b := crash.Binary; b == nil || !b.Ended || b.Exit != 2 {
		t.Fatalf("crashtest binary: %+v, want ended with exit 2", b)
	}
	if len(crash.Tests) != 2 || crash.Tests[0].Action != "pass" || crash.Tests[1].Name != "TestCrash" || crash.Tests[1].Action == "pass" {
		for _, tr := range crash.Tests {
			t.Logf("crashtest: %s %q", tr.Name, tr.Action)
		}
		t.Errorf("crashtest: want TestBeforeCrash passed and TestCrash not passed")
	}
	if p := res.PackageProblems("tests/vm/internal/crashtest", crash); len(p) != 0 {
		// TestCrash is reported as failed (or unfinished): that fails the
		// package already, so no extra problem is expected.
		t.Errorf("crashtest PackageProblems = %q, want none beyond the failed test", p)
	}
}

func allOutput(tr *vm.TestResult) []string {
	out := append([]string{}, tr.Output...)
	for _, st := range tr.Subtests {
		out = append(out, allOutput(st)...)
	}
	return out
}

// TestRecordedTranscript parses a results stream recorded from a real boot
// (go test -run TestHarness -record rewrites it).
func TestRecordedTranscript(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "selftest.transcript"))
	if err != nil {
		t.Fatal(err)
	}
	nonce, stream, _ := bytes.Cut(data, []byte("\n"))
	res, err := vm.ParseResults(bytes.NewReader(stream), string(nonce), harnessTests)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Booted || !res.Done || len(res.Binaries) != 2 {
		t.Fatalf("parsed: booted %t done %t, %d binaries; want a complete boot of 2", res.Booted, res.Done, len(res.Binaries))
	}
	checkSelftest(t, res)
}

// TestBootFailures checks that a VM that never reaches its tests is reported
// as such: a timeout, and a kernel that panics (no init).
func TestBootFailures(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	ctx := t.Context()
	img, err := vm.Build(ctx, vm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		// Under TCG the kernel alone takes seconds to boot.
		res, err := vm.Boot(ctx, img, vm.BootOptions{Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("Boot took %s with a 300ms timeout", d)
		}
		if res.Booted || res.Err == nil || !strings.Contains(res.Err.Error(), "timed out") {
			t.Errorf("Boot: booted %t, Err %v; want a timeout", res.Booted, res.Err)
		}
	})
	t.Run("panic", func(t *testing.T) {
		var console bytes.Buffer
		res, err := vm.Boot(ctx, img, vm.BootOptions{Append: "rdinit=/nonexistent", Console: &console, Timeout: 2 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if res.Booted || res.Err == nil || len(res.Problems()) == 0 {
			t.Errorf("Boot: booted %t, Err %v, Problems %q; want a failed boot", res.Booted, res.Err, res.Problems())
		}
		if !bytes.Contains(res.Console, []byte("Kernel panic")) || !bytes.Equal(res.Console, console.Bytes()) {
			t.Errorf("console does not show the panic (or differs from BootOptions.Console):\n%s", tailString(res.Console))
		}
	})
}

func tailString(b []byte) string {
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// cpioEntry is one record read back from a newc archive.
type cpioEntry struct {
	Path string
	Mode uint32
	Data string
}

// readNewc parses concatenated newc archives (as the kernel does) and
// returns their entries in order; later archives follow earlier ones.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for off < len(b) {
		if len(b)-off < 110 || string(b[off:off+6]) != "070701" {
			t.Fatalf("offset %d: no newc header", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("offset %d field %d: %v", off, i, err)
			}
			return int(v)
		}
		mode, uid, gid, size, namesize := field(1), field(2), field(3), field(6), field(11)
		if uid != 0 || gid != 0 {
			t.Errorf("offset %d: owner %d:%d, want root", off, uid, gid)
		}
		name := string(b[off+110 : off+110+namesize-1])
		dataOff := align(off + 110 + namesize)
		data := b[dataOff : dataOff+size]
		off = align(dataOff + size)
		if name == "TRAILER!!!" {
			continue
		}
		out = append(out, cpioEntry{Path: name, Mode: uint32(mode), Data: string(data)})
	}
	return out
}

func TestArchive(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "prog"), []byte("#!/bin/sh\necho hi\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(src, "tree", "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "tree", "sub", "f"), []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("sub/f", filepath.Join(src, "tree", "link")); err != nil {
		t.Fatal(err)
	}
	var a Archive
	a.Bytes("/etc/hosts", []byte("127.0.0.1 localhost\n"), 0o644)
	a.Symlink("var/run", "../run")
	a.Dir("tmp", fs.ModeSticky|0o777)
	if err := a.File("usr/bin/prog", filepath.Join(src, "prog")); err != nil {
		t.Fatal(err)
	}
	if err := a.Tree("opt/t", filepath.Join(src, "tree")); err != nil {
		t.Fatal(err)
	}
	if err := a.File("nope", filepath.Join(src, "missing")); err == nil {
		t.Error("File of a missing source succeeded")
	}
	var buf bytes.Buffer
	n, err := a.WriteTo(&buf)
	if err != nil || n != int64(buf.Len()) || n%4 != 0 {
		t.Fatalf("WriteTo = %d, %v (buffer %d bytes); want all bytes, a multiple of 4", n, err, buf.Len())
	}
	want := []cpioEntry{
		{"etc", 0o40755, ""},
		{"etc/hosts", 0o100644, "127.0.0.1 localhost\n"},
		{"opt", 0o40755, ""},
		{"opt/t", 0o40755, ""},
		{"opt/t/link", 0o120777, "sub/f"},
		{"opt/t/sub", 0o40755, ""},
		{"opt/t/sub/f", 0o100600, "12345"},
		{"tmp", 0o41777, ""},
		{"usr", 0o40755, ""},
		{"usr/bin", 0o40755, ""},
		{"usr/bin/prog", 0o100755, "#!/bin/sh\necho hi\n"},
		{"var", 0o40755, ""},
		{"var/run", 0o120777, "../run"},
	}
	if diff := cmp.Diff(want, readNewc(t, buf.Bytes())); diff != "" {
		t.Errorf("archive (-want +got):\n%s", diff)
	}
	if a.Size() != int64(len("127.0.0.1 localhost\n")+len("#!/bin/sh\necho hi\n")+5) {
		t.Errorf("Size = %d", a.Size())
	}
	// The same inputs give the same bytes.
	var again bytes.Buffer
	a.WriteTo(&again)
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("writing the archive twice gave different bytes")
	}
	// GNU cpio, if present, agrees on the listing.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-it", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -it: %v", err)
		}
		var names []string
		for _, e := range want {
			names = append(names, e.Path)
		}
		if diff := cmp.Diff(names, strings.Fields(string(out))); diff != "" {
			t.Errorf("cpio -it listing (-want +got):\n%s", diff)
		}
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                      "plain",
		"/tests/a_b.test":            "/tests/a_b.test",
		"-test.run=^TestX$":          `'-test.run=^TestX$'`,
		"":                           "''",
		"it's":                       `'it'\''s'`,
		"two words":                  "'two words'",
		"-test.timeout=5m0s":         "-test.timeout=5m0s",
		"$(reboot)":                  "'$(reboot)'",
		"pkg/crypto/wireguard,x+y:z": "pkg/crypto/wireguard,x+y:z",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(in)).Output()
		if err != nil || string(out) != in {
			t.Errorf("sh reads %s as %q (%v), want %q", shellQuote(in), out, err, in)
		}
	}
}

func TestRenderInit(t *testing.T) {
	tests := []*builtTest{
		{Test: Test{Run: RunOnly("TestA", "TestB"), Args: []string{"-test.short"}}, Name: "pkg/a", file: "pkg_a.test"},
		{Test: Test{Timeout: time.Minute}, Name: "pkg/b", file: "pkg_b.test"},
	}
	sh, err := renderInit([]string{"wireguard", "esp4"}, tests)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"for m in wireguard esp4; do",
		"run pkg/a /src/pkg/a /tests/pkg_a.test -test.v=test2json -test.timeout=5m0s -test.count=1 '-test.run=^(TestA|TestB)$' -test.short\n",
		"run pkg/b /src/pkg/b /tests/pkg_b.test -test.v=test2json -test.timeout=1m0s -test.count=1\n",
		"MESHCRYPT_VM=1",
		"exec 3>/dev/ttyS1",
		"poweroff -f",
	} {
		if !bytes.Contains(sh, []byte(want)) {
			t.Errorf("init script lacks %q:\n%s", want, sh)
		}
	}
	p := filepath.Join(t.TempDir(), "init")
	os.WriteFile(p, sh, 0o755)
	if out, err := exec.Command("sh", "-n", p).CombinedOutput(); err != nil {
		t.Errorf("sh -n init: %v\n%s", err, out)
	}
}

func TestRunOnly(t *testing.T) {
	re := regexp.MustCompile(RunOnly("TestA", "TestB.x"))
	for name, want := range map[string]bool{"TestA": true, "TestB.x": true, "TestAB": false, "TestBax": false, "XTestA": false} {
		if got := re.MatchString(name); got != want {
			t.Errorf("%s matches %s: %t, want %t", re, name, got, want)
		}
	}
	_, err := compileTests(t.Context(), t.TempDir(), t.TempDir(), []Test{{Package: "pkg/x", Run: "^(TestA"}})
	if err == nil || !strings.Contains(err.Error(), "Run pattern") {
		t.Errorf("compileTests with a bad Run pattern: %v, want it refused", err)
	}
}

func TestQemuArgs(t *testing.T) {
	args := strings.Join(qemuArgs("/k", "/i", "n0nce", BootOptions{}), " ")
	for _, want := range []string{"-accel tcg", "-cpu max", "-smp 2", "-m 1024", "-no-reboot", "-kernel /k", "-initrd /i",
		"-serial chardev:console -serial chardev:results", "meshcrypt.nonce=n0nce", "panic=-1"} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q: %s", want, args)
		}
	}
	if strings.Contains(args, "-netdev") || strings.Contains(args, "meshcrypt.net") {
		t.Errorf("qemu args without forwards have a network: %s", args)
	}
	args = strings.Join(qemuArgs("/k", "/i", "n", BootOptions{Memory: 2048, CPUs: 1, Append: "foo=bar", Network: true}), " ")
	for _, want := range []string{"-m 2048", "-smp 1", "meshcrypt.net=1", "foo=bar",
		"-netdev user,id=net0", "-device virtio-net-pci,netdev=net0"} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q: %s", want, args)
		}
	}
}

func TestResolveModules(t *testing.T) {
	dir := t.TempDir()
	dep := `kernel/drivers/net/wireguard/wireguard.ko: kernel/net/ipv4/udp_tunnel.ko kernel/lib/crypto/libchacha.ko
kernel/net/ipv4/udp_tunnel.ko:
kernel/lib/crypto/libchacha.ko:
kernel/crypto/ghash-generic.ko:
kernel/crypto/gcm.ko:
kernel/net/sched/sch_netem.ko:
kernel/net/sched/cls_bpf.ko: kernel/lib/crypto/libchacha.ko
kernel/drivers/net/veth.ko:
`
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644)
	os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/crypto/aes_generic.ko\n"), 0o644)
	for _, f := range []string{"kernel/net/sched/sch_netem.ko", "kernel/net/sched/cls_bpf.ko", "kernel/net/sched/not-in-dep.txt"} {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(f)), 0o755)
		os.WriteFile(filepath.Join(dir, f), nil, 0o644)
	}
	idx, err := loadModuleIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	set, err := resolveModules(dir, idx, []string{"wireguard", "ghash-generic", "aes_generic", "wireguard"}, []string{"kernel/net/sched"})
	if err != nil {
		t.Fatal(err)
	}
	want := &moduleSet{
		load:    []string{"wireguard", "ghash_generic"},
		builtin: []string{"aes_generic"},
		files: []string{"kernel/crypto/ghash-generic.ko", "kernel/drivers/net/wireguard/wireguard.ko", "kernel/lib/crypto/libchacha.ko",
			"kernel/net/ipv4/udp_tunnel.ko", "kernel/net/sched/cls_bpf.ko", "kernel/net/sched/sch_netem.ko"},
	}
	if diff := cmp.Diff(want, set, cmp.AllowUnexported(moduleSet{})); diff != "" {
		t.Errorf("resolveModules (-want +got):\n%s", diff)
	}
	if _, err := resolveModules(dir, idx, []string{"nosuchmod"}, nil); err == nil || !strings.Contains(err.Error(), "nosuchmod") {
		t.Errorf("unknown module: %v, want an error naming it", err)
	}
}

func TestHostFiles(t *testing.T) {
	files, err := hostFiles("sh")
	if err != nil {
		t.Fatal(err)
	}
	hasBase := func(name string) bool {
		return slices.ContainsFunc(files, func(f string) bool { return filepath.Base(f) == name })
	}
	if !hasBase("libc.so.6") || !hasBase("ld-linux-x86-64.so.2") {
		t.Errorf("hostFiles(sh) = %q, want libc and the loader", files)
	}
	if _, err := hostFiles("no-such-program-xyz"); err == nil {
		t.Error("hostFiles of a missing program succeeded")
	}
}

func TestParser(t *testing.T) {
	const nonce = "abc"
	stream := strings.Join([]string{
		"",
		"@@meshcrypt-vm abc module-error esp9",
		"@@meshcrypt-vm abc boot 2.50\r",
		"",
		"@@meshcrypt-vm abc begin pkg/a 2.60",
		"line 1",
		"",
		"line 3 after a blank line",
		"@@meshcrypt-vm forged end pkg/a 0 9.99",
		"no newline@@meshcrypt-vm abc end pkg/a 1 4.10",
		"",
		"@@meshcrypt-vm abc begin pkg/b 4.20",
		"partial output",
	}, "\n")
	res, err := ParseResults(strings.NewReader(stream), nonce, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Booted || res.Done || res.GuestBootUptime != 2500*time.Millisecond {
		t.Errorf("booted %t done %t uptime %s; want booted at 2.5s, not done", res.Booted, res.Done, res.GuestBootUptime)
	}
	if diff := cmp.Diff([]string{"esp9"}, res.ModuleErrors); diff != "" {
		t.Errorf("ModuleErrors (-want +got):\n%s", diff)
	}
	want := []*BinaryResult{
		{Name: "pkg/a", Ended: true, Exit: 1, Elapsed: 1500 * time.Millisecond,
			Output: []byte("line 1\n\nline 3 after a blank line\n@@meshcrypt-vm forged end pkg/a 0 9.99\nno newline\n")},
		{Name: "pkg/b", Output: []byte("partial output\n")},
	}
	if diff := cmp.Diff(want, res.Binaries); diff != "" {
		t.Errorf("binaries (-want +got):\n%s", diff)
	}
	if p := res.Problems(); len(p) != 1 || !strings.Contains(p[0], "esp9") {
		t.Errorf("Problems = %q, want the module error", p)
	}
	pr := &PackageResult{Binary: res.Binaries[1]}
	if p := res.PackageProblems("pkg/b", pr); len(p) != 1 || !strings.Contains(p[0], "did not finish") {
		t.Errorf("PackageProblems(unfinished) = %q", p)
	}
	pr = &PackageResult{Binary: res.Binaries[0]}
	if p := res.PackageProblems("pkg/a", pr); len(p) != 1 || !strings.Contains(p[0], "exited with status 1 and no failed test") {
		t.Errorf("PackageProblems(exit 1 without failures) = %q", p)
	}
	if p := res.PackageProblems("pkg/never", &PackageResult{}); len(p) != 1 || !strings.Contains(p[0], "never started") {
		t.Errorf("PackageProblems(never started) = %q", p)
	}
}

func TestDecodeEvents(t *testing.T) {
	var js strings.Builder
	ev := func(action, test, output string) {
		fmt.Fprintf(&js, `{"Action":%q,"Test":%q,"Output":%q,"Elapsed":0.5}`+"\n", action, test, output)
	}
	// As go tool test2json reports tests of -test.v=test2json output: no Elapsed.
	plain := func(action, test, output string) {
		b, _ := json.Marshal(struct{ Action, Test, Output string }{action, test, output})
		js.Write(append(b, '\n'))
	}
	ev("run", "TestA", "")
	ev("output", "TestA", "=== RUN   TestA\n")
	ev("output", "TestA", "    a_test.go:1: hi\n")
	ev("run", "TestA/x/y", "")
	ev("run", "TestA/x/y/z", "")
	ev("pass", "TestA/x/y/z", "")
	ev("skip", "TestA/x/y", "")
	ev("fail", "TestA", "")
	ev("run", "TestB", "")
	plain("run", "TestC", "")
	plain("run", "TestC/sub", "")
	plain("output", "TestC/sub", "\x16    --- PASS: TestC/sub (1.25s)\n")
	plain("pass", "TestC/sub", "")
	plain("output", "TestC", "\x16--- PASS: TestC (2m3.5s)\n")
	plain("pass", "TestC", "")
	ev("output", "", "FAIL\n")
	top, pkg, err := decodeEvents([]byte(js.String()))
	if err != nil {
		t.Fatal(err)
	}
	want := []*TestResult{
		{Name: "TestA", Action: "fail", Elapsed: 500 * time.Millisecond, Output: []string{"    a_test.go:1: hi"}, Subtests: []*TestResult{
			{Name: "TestA/x/y", Action: "skip", Elapsed: 500 * time.Millisecond, Subtests: []*TestResult{
				{Name: "TestA/x/y/z", Action: "pass", Elapsed: 500 * time.Millisecond},
			}},
		}},
		{Name: "TestB"},
		{Name: "TestC", Action: "pass", Elapsed: 123500 * time.Millisecond, Output: []string{"\x16--- PASS: TestC (2m3.5s)"}, Subtests: []*TestResult{
			{Name: "TestC/sub", Action: "pass", Elapsed: 1250 * time.Millisecond, Output: []string{"\x16    --- PASS: TestC/sub (1.25s)"}},
		}},
	}
	if diff := cmp.Diff(want, top); diff != "" {
		t.Errorf("tests (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"FAIL"}, pkg); diff != "" {
		t.Errorf("package output (-want +got):\n%s", diff)
	}
	if !top[0].failed() || !top[1].failed() || top[0].Subtests[0].failed() {
		t.Error("failed(): want TestA (fail) and TestB (unfinished) failed, TestA/x/y (skip) not")
	}
}

func TestParseApt(t *testing.T) {
	deps := "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n  Depends: other\n"
	if got := parseDepends([]byte(deps), "linux-image-"); got != "linux-image-6.1.0-56-cloud-amd64" {
		t.Errorf("parseDepends = %q", got)
	}
	show := "Package: linux-image-6.1.0-56-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n"
	if got := parseField([]byte(show), "Version"); got != "6.1.192-2" {
		t.Errorf("parseField = %q", got)
	}
}

// TestImageContents builds an image (fetching the kernel into the cache if
// needed) without booting it and checks what the guest will find, for each
// kernel the suites boot (vmKernels in kernels_test.go): 6.1 ships plain
// modules, 6.12 xz-compressed ones, which must arrive decompressed.
func TestImageContents(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads the kernel package on first use")
	}
	for _, k := range []struct {
		name string
		opts KernelOptions
	}{
		{"6.1", KernelOptions{}},
		{"6.12", KernelOptions{Release: "trixie"}},
	} {
		t.Run(k.name, func(t *testing.T) { testImageContents(t, k.opts) })
	}
}

func testImageContents(t *testing.T, kopts KernelOptions) {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	img, err := Build(ctx, Options{
		Tests:        []Test{{Package: "tests/vm/internal/selftest"}},
		HostPrograms: []string{"sh"},
		Files:        []File{{Path: "/etc/meshcrypt/extra", Data: []byte("x")}},
		Kernel:       kopts,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	data, err := os.ReadFile(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]cpioEntry{}
	for _, e := range readNewc(t, data) {
		entries[e.Path] = e
	}
	rel := img.Kernel.Release
	mod := "lib/modules/" + rel + "/"
	for p, check := range map[string]func(e cpioEntry) bool{
		"init":                func(e cpioEntry) bool { return e.Mode == 0o100755 && strings.HasPrefix(e.Data, "#!/bin/sh") },
		"bin/busybox":         func(e cpioEntry) bool { return e.Mode&0o111 != 0 },
		"sbin/modprobe":       func(e cpioEntry) bool { return e.Mode == 0o120777 && e.Data == "/bin/busybox" },
		"bin/sh":              func(e cpioEntry) bool { return e.Data == "/bin/busybox" },
		"var/run":             func(e cpioEntry) bool { return e.Data == "../run" },
		"tmp":                 func(e cpioEntry) bool { return e.Mode == 0o41777 },
		"etc/passwd":          func(e cpioEntry) bool { return strings.HasPrefix(e.Data, "root:x:0:0:") },
		"etc/meshcrypt/extra": func(e cpioEntry) bool { return e.Data == "x" },
		"tests/tests_vm_internal_selftest.test": func(e cpioEntry) bool {
			return strings.HasPrefix(e.Data, "\x7fELF")
		},
		"src/tests/vm/internal/selftest":                  func(e cpioEntry) bool { return e.Mode == 0o40755 },
		mod + "kernel/drivers/net/wireguard/wireguard.ko": func(e cpioEntry) bool { return strings.HasPrefix(e.Data, "\x7fELF") },
		mod + "kernel/net/sched/sch_netem.ko":             func(e cpioEntry) bool { return true },
		mod + "kernel/drivers/net/virtio_net.ko":          func(e cpioEntry) bool { return true },
		mod + "modules.dep": func(e cpioEntry) bool {
			return strings.Contains(e.Data, "kernel/drivers/net/wireguard/wireguard.ko: ") && !strings.Contains(e.Data, "kernel/fs/")
		},
		mod + "modules.alias":            func(e cpioEntry) bool { return strings.Contains(e.Data, "alias crypto-gcm gcm") },
		"lib/x86_64-linux-gnu/libc.so.6": func(e cpioEntry) bool { return strings.HasPrefix(e.Data, "\x7fELF") },
	} {
		e, ok := entries[p]
		if !ok {
			t.Errorf("initramfs lacks %s", p)
			continue
		}
		if !check(e) {
			t.Errorf("initramfs %s: mode %o, data %.80q: unexpected", p, e.Mode, e.Data)
		}
	}
	for p := range entries {
		if strings.HasPrefix(p, mod) && (strings.HasSuffix(p, ".xz") || strings.HasSuffix(p, ".zst") || strings.HasSuffix(p, ".gz")) {
			t.Errorf("initramfs has a compressed module %s; busybox's modprobe loads it as it is", p)
		}
	}
	if !slices.Equal(img.Files, slices.Sorted(maps.Keys(entries))) {
		t.Errorf("Image.Files differs from the archive's paths")
	}
	t.Logf("initramfs: %d entries, %d MiB", len(entries), len(data)>>20)

	// Boot-time files and environment go into an appended archive.
	dst := filepath.Join(t.TempDir(), "initrd")
	if _, err := bootInitrd(img.Initrd, dst, BootOptions{Env: map[string]string{"B": "it's", "A": "1"},
		Files: []File{{Path: "/etc/kubeconfig", Data: []byte("k"), Mode: 0o600}}}); err != nil {
		t.Fatal(err)
	}
	combined, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(combined, data) {
		t.Fatal("boot initrd does not start with the image's")
	}
	extra := readNewc(t, combined[len(data):])
	wantExtra := []cpioEntry{
		{"etc", 0o40755, ""},
		{"etc/kubeconfig", 0o100600, "k"},
		{"etc/meshcrypt-vm", 0o40755, ""},
		{"etc/meshcrypt-vm/env", 0o100644, "export A=1\nexport B='it'\\''s'\n"},
	}
	if diff := cmp.Diff(wantExtra, extra); diff != "" {
		t.Errorf("boot archive (-want +got):\n%s", diff)
	}
}

var _ io.WriterTo = (*Archive)(nil)

// TestDeps guards the boundary stated in doc.go: the harness imports no
// meshcrypt package under pkg/ or cmd/.
func TestDeps(t *testing.T) {
	out, err := exec.Command(goTool(), "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for dep := range strings.FieldsSeq(string(out)) {
		if strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/pkg/") || strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/cmd/") {
			t.Errorf("tests/vm depends on %s", dep)
		}
	}
}

func TestCleanupStale(t *testing.T) {
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	mine, err := ownedTempDir("meshcrypt-vm-test-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(mine)
	stale, err := ownedTempDir("meshcrypt-vm-test-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(stale)
	os.WriteFile(filepath.Join(stale, ownerFile), []byte(strconv.Itoa(dead.Process.Pid)), 0o644)
	foreign, err := os.MkdirTemp("", "meshcrypt-vm-test-*") // no owner file: left alone
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(foreign)
	if err := CleanupStale(); err != nil {
		t.Fatal(err)
	}
	for d, want := range map[string]bool{mine: true, stale: false, foreign: true} {
		if got := isDir(d); got != want {
			t.Errorf("%s exists = %t after CleanupStale, want %t", d, got, want)
		}
	}
}

// TestStageModules stages plain and compressed modules: the compressed ones
// arrive decompressed, under the name without the suffix, and the sources
// stay as they were.
func TestStageModules(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	contents := map[string]string{ // staged name -> contents
		"kernel/net/plain.ko":             "\x7fELF plain",
		"kernel/drivers/net/wireguard.ko": "\x7fELF wireguard",
		"kernel/crypto/gcm.ko":            "\x7fELF gcm",
		"kernel/crypto/seqiv.ko":          "\x7fELF seqiv",
	}
	// As the package ships them: one plain, the others compressed the ways
	// CONFIG_MODULE_COMPRESS_* can.
	shipped := map[string]string{
		"kernel/net/plain.ko":                "",
		"kernel/drivers/net/wireguard.ko.xz": "xz",
		"kernel/crypto/gcm.ko.zst":           "zstd",
		"kernel/crypto/seqiv.ko.gz":          "gzip",
	}
	for f, tool := range shipped {
		p := filepath.Join(src, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		plain := contents[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(f, ".xz"), ".zst"), ".gz")]
		data := []byte(plain)
		if tool != "" {
			if _, err := exec.LookPath(tool); err != nil {
				t.Fatalf("%s (hack/vm-deps.sh installs it): %v", tool, err)
			}
			cmd := exec.Command(tool, "-c", "-q")
			cmd.Stdin = strings.NewReader(plain)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("compress with %s: %v", tool, err)
			}
			data = out
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	staged, err := stageModules(t.Context(), src, dst, slices.Sorted(maps.Keys(shipped)))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(slices.Sorted(maps.Keys(contents)), slices.Sorted(slices.Values(staged))); diff != "" {
		t.Errorf("staged (-want +got):\n%s", diff)
	}
	for f, want := range contents {
		if b, err := os.ReadFile(filepath.Join(dst, f)); err != nil || string(b) != want {
			t.Errorf("staged %s: %q, %v; want %q", f, b, err, want)
		}
	}
	var left []string
	filepath.WalkDir(dst, func(p string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() && !strings.HasSuffix(p, ".ko") {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("compressed files left in the staging tree: %q", left)
	}
	for f := range shipped {
		if _, err := os.Stat(filepath.Join(src, f)); err != nil {
			t.Errorf("source %s: %v; the cache must stay as it was", f, err)
		}
	}
	// Garbage with a compression suffix fails with the tool's package named.
	if err := os.WriteFile(filepath.Join(src, "kernel/bad.ko.xz"), []byte("not xz"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := stageModules(t.Context(), src, t.TempDir(), []string{"kernel/bad.ko.xz"}); err == nil || !strings.Contains(err.Error(), "xz-utils") {
		t.Errorf("stage a corrupt .ko.xz: %v, want an error naming xz-utils", err)
	}
}

// TestNewestCached picks the cached kernel of the asked series when apt
// cannot answer: by package, else by the selector it was fetched for (a
// stamp without one is the default metapackage's).
func TestNewestCached(t *testing.T) {
	kdir := t.TempDir()
	now := time.Now()
	add := func(dir, stamp string, age time.Duration) {
		t.Helper()
		d := filepath.Join(kdir, dir)
		rel := strings.TrimPrefix(regexp.MustCompile(`release=\S+`).FindString(stamp), "release=")
		for _, f := range []string{"boot/vmlinuz-" + rel, "lib/modules/" + rel + "/modules.dep"} {
			if err := os.MkdirAll(filepath.Dir(filepath.Join(d, f)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, f), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(d, "meshcrypt-kernel"), []byte(stamp), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(d, now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	add("old61", "package=linux-image-6.1.0-56-cloud-amd64\nversion=6.1.192-2\nrelease=6.1.0-56-cloud-amd64\n", 3*time.Hour)
	add("new61", "package=linux-image-6.1.0-57-cloud-amd64\nversion=6.1.192-3\nrelease=6.1.0-57-cloud-amd64\nselector=linux-image-cloud-amd64\n", 2*time.Hour)
	add("trixie", "package=linux-image-6.12.118+deb13-cloud-amd64\nversion=6.12.118-1\nrelease=6.12.118+deb13-cloud-amd64\nselector=linux-image-cloud-amd64@trixie\n", time.Hour)
	for _, tt := range []struct {
		pkg, selector, want string
	}{
		{"", "linux-image-cloud-amd64", "6.1.0-57-cloud-amd64"},
		{"", "linux-image-cloud-amd64@trixie", "6.12.118+deb13-cloud-amd64"},
		{"linux-image-6.1.0-56-cloud-amd64", "", "6.1.0-56-cloud-amd64"},
		{"", "linux-image-cloud-amd64@bookworm", ""},
	} {
		k, err := newestCached(kdir, tt.pkg, tt.selector)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("newestCached(%q, %q) = %s, want none", tt.pkg, tt.selector, k.Release)
		case tt.want != "" && (err != nil || k.Release != tt.want):
			t.Errorf("newestCached(%q, %q) = %+v, %v; want %s", tt.pkg, tt.selector, k, err, tt.want)
		}
	}
	if got := (KernelOptions{Release: "trixie"}).selector(); got != "linux-image-cloud-amd64@trixie" {
		t.Errorf("selector = %q", got)
	}
}

// TestAptConfig checks the private apt state of a kernel from another
// release: the machine's apt gets no options, a private state reads only
// its own files, names the release and its security suite, and is stale
// until its sources and fresh lists are there.
func TestAptConfig(t *testing.T) {
	if got := (aptConfig{}).args("show", "x"); !slices.Equal(got, []string{"show", "x"}) {
		t.Errorf("machine's apt args = %q", got)
	}
	dir := t.TempDir()
	a := aptConfig{dir: dir, release: "trixie"}
	args := strings.Join(a.args("depends", "linux-image-cloud-amd64"), " ")
	for _, want := range []string{"Dir::Etc::SourceList=" + dir + "/sources.list", "Dir::Etc::SourceParts=" + dir + "/",
		"Dir::State::Lists=" + dir + "/lists", "Dir::Cache=" + dir + "/cache", "Dir::Etc::Preferences=/dev/null"} {
		if !strings.Contains(args, want) {
			t.Errorf("args %q lack %q", args, want)
		}
	}
	if !strings.HasSuffix(args, " depends linux-image-cloud-amd64") {
		t.Errorf("args %q do not end with the command", args)
	}
	wantSources := "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n" +
		"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main\n"
	if diff := cmp.Diff(wantSources, a.sources()); diff != "" {
		t.Errorf("sources (-want +got):\n%s", diff)
	}
	if !a.stale() {
		t.Error("an empty state is not stale")
	}
	os.MkdirAll(filepath.Join(dir, "lists"), 0o755)
	os.WriteFile(filepath.Join(dir, "sources.list"), []byte(a.sources()), 0o644)
	list := filepath.Join(dir, "lists", "deb.debian.org_debian_dists_trixie_main_binary-amd64_Packages")
	os.WriteFile(list, nil, 0o644)
	if a.stale() {
		t.Error("fresh sources and lists are stale")
	}
	old := time.Now().Add(-2 * aptListsMaxAge)
	os.Chtimes(list, old, old)
	if !a.stale() {
		t.Error("lists two days old are not stale")
	}
	os.Chtimes(list, time.Now(), time.Now())
	if (aptConfig{dir: dir, release: "forky"}).stale() == false {
		t.Error("a state whose sources name another release is not stale")
	}
}

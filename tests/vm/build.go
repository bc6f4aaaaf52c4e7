package vm

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Test is one package whose tests run in the VM.
type Test struct {
	// Package is the package directory relative to the module root
	// ("pkg/crypto/wireguard", "./pkg/datapath"); its test binary is built
	// with `go test -c` and reported under this name.
	Package string
	// Run is the binary's -test.run pattern: only the tests it matches run
	// in the VM; "" runs them all. [RunOnly] builds one for a list of test
	// names. Build rejects a pattern that does not compile.
	Run string
	// Args are extra test flags, e.g. "-test.skip=^TestDeps$" for tests that
	// need the source tree or the go command, which the VM does not have.
	// They come after Run's flag on the command line.
	Args []string
	// Timeout is the binary's -test.timeout; 0 means DefaultTestTimeout.
	Timeout time.Duration
	// MustRun names tests (full names: "TestX" or "TestX/sub") that must
	// run and not skip in the VM: the tests the VM exists for (a kernel
	// feature the host lacks). Report fails the package when one skips or
	// is missing.
	MustRun []string
}

// RunOnly returns a Test.Run pattern that matches exactly the named
// top-level tests (and all their subtests): "^(TestA|TestB)$".
func RunOnly(names ...string) string {
	quoted := make([]string, len(names))
	for i, n := range names {
		quoted[i] = regexp.QuoteMeta(n)
	}
	return "^(" + strings.Join(quoted, "|") + ")$"
}

// checkRun compiles a -test.run pattern, so a typo fails on the host and not
// as a binary that runs nothing in the VM.
func checkRun(pkg, pattern string) error {
	if _, err := regexp.Compile(pattern); err != nil {
		return fmt.Errorf("test package %s: Run pattern %q: %w", pkg, pattern, err)
	}
	return nil
}

// builtTest is a Test with its compiled binary.
type builtTest struct {
	Test
	Name string // module-relative package path, e.g. pkg/crypto/wireguard
	path string // binary on the host
	file string // binary's file name in the guest's test directory
	dir  string // package directory on the host
}

// Options say what goes into the VM image.
type Options struct {
	// Tests are the packages whose tests run in the VM, in order.
	Tests []Test
	// Kernel selects the kernel; see KernelOptions.
	Kernel KernelOptions
	// Modules are loaded at boot (with their dependencies); nil means
	// DefaultModules.
	Modules []string
	// ModuleDirs are included for autoloading; nil means DefaultModuleDirs.
	ModuleDirs []string
	// Programs are Go main packages of the module (e.g.
	// "cmd/meshcrypt-agent"), built static and installed in the guest's
	// ProgramDir under their base names.
	Programs []string
	// HostPrograms are host programs copied into the guest with their
	// shared libraries, at their host paths (e.g. "ip" for iproute2's
	// `ip netns exec`, which busybox's ip lacks).
	HostPrograms []string
	// Files are extra files for the guest.
	Files []File
	// ModuleRoot is the Go module's directory; "" means the one enclosing
	// the working directory.
	ModuleRoot string
	// WorkDir receives the test binaries and the initramfs; "" means a new
	// temporary directory, removed by Image.Close.
	WorkDir string
	// Compress gzips the initramfs. An uncompressed archive boots faster
	// under TCG (the guest kernel unpacks gzip slowly) and costs only host
	// memory, so the default is off.
	Compress bool
	// Logger receives progress; nil discards.
	Logger *slog.Logger
}

// Image is a kernel and an initramfs ready to boot.
type Image struct {
	// Kernel is the kernel package the image boots.
	Kernel *Kernel
	// Initrd is the initramfs.
	Initrd string
	// Tests are the package names in the order the guest runs them.
	Tests []string
	// Files lists the initramfs paths in archive order.
	Files []string
	// BuildTime is how long Build took; CompileTime the part spent in
	// `go test -c`.
	BuildTime, CompileTime time.Duration

	specs   map[string]Test
	workDir string
	ownDir  bool
}

// Close removes the image's work directory if Build created it.
func (img *Image) Close() error {
	if img.ownDir {
		return os.RemoveAll(img.workDir)
	}
	return nil
}

// Build fetches the kernel, compiles the test binaries (static, with
// CGO_ENABLED=0, in parallel; Go's build cache makes repeated builds cheap)
// and writes the initramfs.
func Build(ctx context.Context, opts Options) (*Image, error) {
	start := time.Now()
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Kernel.Logger == nil {
		opts.Kernel.Logger = log
	}
	root := opts.ModuleRoot
	if root == "" {
		var err error
		if root, err = moduleRoot(ctx); err != nil {
			return nil, err
		}
	}
	img := &Image{workDir: opts.WorkDir, specs: map[string]Test{}}
	if img.workDir == "" {
		if err := CleanupStale(); err != nil {
			log.Warn("remove stale VM directories", "error", err)
		}
		d, err := ownedTempDir("meshcrypt-vm-*")
		if err != nil {
			return nil, err
		}
		img.workDir, img.ownDir = d, true
	}
	ok := false
	defer func() {
		if !ok {
			img.Close()
		}
	}()

	// The kernel download and the compilations overlap.
	var (
		wg               sync.WaitGroup
		kernErr, progErr error
		progs            map[string]string
	)
	wg.Go(func() { img.Kernel, kernErr = FetchKernel(ctx, opts.Kernel) })
	cstart := time.Now()
	wg.Go(func() { progs, progErr = compilePrograms(ctx, root, filepath.Join(img.workDir, "prog"), opts.Programs) })
	tests, err := compileTests(ctx, root, filepath.Join(img.workDir, "bin"), opts.Tests)
	wg.Wait()
	img.CompileTime = time.Since(cstart)
	if err := errors.Join(err, progErr, kernErr); err != nil {
		return nil, err
	}
	log.Info("compiled tests", "packages", len(tests), "took", img.CompileTime.Round(time.Millisecond))
	for _, b := range tests {
		img.Tests = append(img.Tests, b.Name)
		img.specs[b.Name] = b.Test
	}

	a, err := buildArchive(ctx, img.Kernel, &opts, tests, progs, img.workDir)
	if err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	img.Files = a.Paths()
	img.Initrd = filepath.Join(img.workDir, "initrd.cpio")
	if opts.Compress {
		img.Initrd += ".gz"
	}
	if err := writeArchive(a, img.Initrd, opts.Compress); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	img.BuildTime = time.Since(start)
	log.Info("built VM image", "kernel", img.Kernel.Release, "initrd", img.Initrd, "files", len(img.Files),
		"MiB", a.Size()>>20, "took", img.BuildTime.Round(time.Millisecond))
	ok = true
	return img, nil
}

func writeArchive(a *Archive, p string, compress bool) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	if compress {
		zw, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
		_, err = a.WriteTo(zw)
		err = errors.Join(err, zw.Close())
	} else {
		_, err = a.WriteTo(f)
	}
	return errors.Join(err, f.Close())
}

// ownerFile names the process that owns a temporary directory of this
// package.
const ownerFile = "owner.pid"

// ownedTempDir creates a temporary directory recording this process as its
// owner, for CleanupStale.
func ownedTempDir(pattern string) (string, error) {
	d, err := os.MkdirTemp("", pattern)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(d, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		os.RemoveAll(d)
		return "", err
	}
	return d, nil
}

// CleanupStale removes the temporary directories (images, boot files) of
// processes that died without cleaning up, e.g. a test binary killed by its
// timeout. A VM of such a process died with it (Pdeathsig).
func CleanupStale() error {
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), "meshcrypt-vm-*"))
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, ownerFile))
		if err != nil {
			continue // not ours, or still being created
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		errs = append(errs, os.RemoveAll(d))
	}
	return errors.Join(errs...)
}

// moduleRoot returns the directory of the enclosing module's go.mod.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := run(ctx, "", goTool(), "env", "GOMOD")
	if err != nil {
		return "", err
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module: set Options.ModuleRoot")
	}
	return filepath.Dir(gomod), nil
}

// goTool returns the go command: `go test` puts its GOROOT/bin first in
// PATH.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go"
}

// compileTests builds one static test binary per package, concurrently.
func compileTests(ctx context.Context, root, out string, tests []Test) ([]*builtTest, error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	built := make([]*builtTest, len(tests))
	errs := make([]error, len(tests))
	seen := map[string]bool{}
	for i, t := range tests {
		rel := packageName(t.Package)
		if rel == "." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
			return nil, fmt.Errorf("test package %q: want a directory inside the module", t.Package)
		}
		if seen[rel] {
			return nil, fmt.Errorf("test package %s listed twice", rel)
		}
		if err := checkRun(rel, t.Run); err != nil {
			return nil, err
		}
		seen[rel] = true
		file := strings.ReplaceAll(rel, "/", "_") + ".test"
		built[i] = &builtTest{Test: t, Name: rel, file: file, path: filepath.Join(out, file), dir: filepath.Join(root, rel)}
	}
	var wg sync.WaitGroup
	for i, b := range built {
		wg.Go(func() {
			if err := goBuild(ctx, root, "test", "-c", "-o", b.path, "-ldflags=-s -w", "./"+b.Name); err != nil {
				errs[i] = err
				return
			}
			if !isFile(b.path) { // a package without test files builds nothing
				errs[i] = fmt.Errorf("go test -c ./%s: no test binary (no test files?)", b.Name)
				return
			}
			errs[i] = checkStatic(b.path)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return built, nil
}

// packageName turns a package directory ("./pkg/datapath/") into the name
// the VM reports it under ("pkg/datapath").
func packageName(dir string) string {
	return filepath.ToSlash(filepath.Clean(strings.TrimPrefix(filepath.ToSlash(dir), "./")))
}

// ProgramDir is where the guest finds Options.Programs (and it is in PATH).
const ProgramDir = "/usr/local/bin"

// compilePrograms builds each main package static into out and returns the
// guest path of each binary mapped to its host path.
func compilePrograms(ctx context.Context, root, out string, pkgs []string) (map[string]string, error) {
	progs := map[string]string{}
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, p := range pkgs {
		name := packageName(p)
		bin := filepath.Join(out, filepath.Base(name))
		guest := path.Join(ProgramDir, filepath.Base(name))
		if _, dup := progs[guest]; dup {
			return nil, fmt.Errorf("two programs named %s", filepath.Base(name))
		}
		progs[guest] = bin
		wg.Go(func() {
			err := goBuild(ctx, root, "build", "-o", bin, "-ldflags=-s -w", "./"+name)
			if err == nil {
				err = checkStatic(bin)
			}
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return progs, nil
}

// goBuild runs the go command in root for linux/amd64 without cgo.
func goBuild(ctx context.Context, root string, args ...string) error {
	cmd := exec.CommandContext(ctx, goTool(), args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out.Bytes())
	}
	return nil
}

// checkStatic fails for a dynamically linked binary: the guest has no libc.
func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked: build it with CGO_ENABLED=0", p)
		}
	}
	return nil
}

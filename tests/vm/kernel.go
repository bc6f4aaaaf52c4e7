package vm

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// DefaultKernelMeta is the Debian metapackage whose dependency names the
// kernel the VM boots when KernelOptions.Package is empty.
const DefaultKernelMeta = "linux-image-cloud-amd64"

// Kernel is an unpacked Debian kernel package in the cache.
type Kernel struct {
	// Package is the Debian package, e.g. linux-image-6.1.0-56-cloud-amd64.
	Package string
	// Version is the package version, e.g. 6.1.192-2.
	Version string
	// Selector is what apt was asked for (see KernelOptions.Meta and
	// Suite), e.g. linux-image-cloud-amd64/bookworm-backports, or the
	// package itself when KernelOptions.Package named it.
	Selector string
	// Release is the kernel release (uname -r), e.g. 6.1.0-56-cloud-amd64.
	Release string
	// Dir is the unpacked package; its lib/modules/<Release> has modules.dep.
	Dir string
}

// Image returns the path of the bootable kernel image (vmlinuz).
func (k *Kernel) Image() string { return filepath.Join(k.Dir, "boot", "vmlinuz-"+k.Release) }

// ModulesDir returns the directory holding the kernel's modules and modules.dep.
func (k *Kernel) ModulesDir() string { return filepath.Join(k.Dir, "lib", "modules", k.Release) }

// KernelOptions selects and caches the kernel.
type KernelOptions struct {
	// Package is the linux-image package to boot. "" means the one that
	// Meta depends on in Suite, except that for the default kernel (Meta
	// and Suite both "") $MESHCRYPT_VM_KERNEL_PACKAGE, when set, names it.
	Package string
	// Meta is the metapackage whose dependency names the kernel when
	// Package is ""; "" means DefaultKernelMeta.
	Meta string
	// Suite is the apt suite (release) whose Meta counts, e.g.
	// "bookworm-backports" for Debian's 6.12 on bookworm: apt is asked for
	// Meta/Suite. "" means apt's candidate (the machine's own release).
	Suite string
	// CacheDir holds unpacked kernels keyed by package and version; ""
	// means DefaultCacheDir().
	CacheDir string
	// Logger receives progress; nil discards.
	Logger *slog.Logger
}

// selector names what opts asks apt for: "linux-image-cloud-amd64" or
// "linux-image-cloud-amd64/bookworm-backports". The cache records it with
// each kernel, so that without apt the fallback picks a kernel of the same
// series.
func (opts KernelOptions) selector() string {
	s := cmp.Or(opts.Meta, DefaultKernelMeta)
	if opts.Suite != "" {
		s += "/" + opts.Suite
	}
	return s
}

// DefaultCacheDir returns ~/.cache/meshcrypt/vm (or $XDG_CACHE_HOME's
// equivalent): outside the repository, shared by every checkout.
func DefaultCacheDir() string {
	d, err := os.UserCacheDir()
	if err != nil {
		d = os.TempDir()
	}
	return filepath.Join(d, "meshcrypt", "vm")
}

// FetchKernel returns the kernel opts selects, downloading it with
// `apt-get download` and unpacking it with `dpkg-deb -x` into the cache
// the first time. When apt cannot name a package (no package lists, no
// network), it falls back to the newest kernel already in the cache that
// was fetched for the same package, or the same metapackage and suite.
// FetchKernel is safe to call from concurrent processes: a kernel is
// unpacked into a temporary directory and renamed into place.
func FetchKernel(ctx context.Context, opts KernelOptions) (*Kernel, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cache := opts.CacheDir
	if cache == "" {
		cache = DefaultCacheDir()
	}
	kdir := filepath.Join(cache, "kernel")
	pkg := opts.Package
	if pkg == "" && opts.Meta == "" && opts.Suite == "" {
		pkg = os.Getenv("MESHCRYPT_VM_KERNEL_PACKAGE")
	}
	sel := opts.selector()
	if pkg != "" {
		// A kernel named by its package is of no metapackage's series.
		sel = pkg
	}
	pkg, version, err := resolveKernel(ctx, pkg, sel)
	if err != nil {
		k, cerr := newestCached(kdir, pkg, sel)
		if cerr != nil {
			return nil, fmt.Errorf("resolve kernel package (run hack/vm-deps.sh, which runs apt-get update): %w", errors.Join(err, cerr))
		}
		log.Warn("cannot ask apt for the kernel; using the cached one", "error", err, "package", k.Package, "version", k.Version)
		return k, nil
	}
	dir := filepath.Join(kdir, pkg+"_"+version)
	if k, err := loadKernel(dir); err == nil {
		return k, nil
	}
	log.Info("downloading kernel", "package", pkg, "version", version, "cache", dir)
	if err := os.MkdirAll(kdir, 0o755); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(kdir, ".fetch-*")
	if err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	// apt-get download writes into its working directory. As root it warns
	// that the _apt user cannot write there and downloads unsandboxed.
	if _, err := run(ctx, tmp, "apt-get", "download", "-q", pkg+"="+version); err != nil {
		return nil, fmt.Errorf("download %s=%s: %w", pkg, version, err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return nil, fmt.Errorf("download %s=%s: got %d .deb files", pkg, version, len(debs))
	}
	unpacked := filepath.Join(tmp, "root")
	if _, err := run(ctx, "", "dpkg-deb", "-x", debs[0], unpacked); err != nil {
		return nil, fmt.Errorf("unpack %s: %w", filepath.Base(debs[0]), err)
	}
	rel, err := kernelRelease(unpacked)
	if err != nil {
		return nil, err
	}
	// The package ships no modules.dep: depmod writes it at install time.
	if _, err := run(ctx, "", "depmod", "-b", unpacked, rel); err != nil {
		return nil, fmt.Errorf("depmod %s: %w", rel, err)
	}
	stamp := fmt.Sprintf("package=%s\nversion=%s\nrelease=%s\nselector=%s\n", pkg, version, rel, sel)
	if err := os.WriteFile(filepath.Join(unpacked, "meshcrypt-kernel"), []byte(stamp), 0o644); err != nil {
		return nil, err
	}
	if err := os.Rename(unpacked, dir); err != nil {
		// Another process may have won the race; its copy is as good.
		if k, lerr := loadKernel(dir); lerr == nil {
			return k, nil
		}
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	return loadKernel(dir)
}

// resolveKernel returns the package to boot and its candidate version:
// pkg, or else the linux-image package that the metapackage selector
// ("META" or "META/SUITE", which apt-cache reads as META in SUITE) depends
// on.
func resolveKernel(ctx context.Context, pkg, selector string) (string, string, error) {
	if pkg == "" {
		out, err := run(ctx, "", "apt-cache", "depends", selector)
		if err != nil {
			return "", "", err
		}
		pkg = parseDepends(out, "linux-image-")
		if pkg == "" {
			return "", "", fmt.Errorf("apt-cache depends %s names no linux-image package", selector)
		}
	}
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return pkg, "", err
	}
	v := parseField(out, "Version")
	if v == "" {
		return pkg, "", fmt.Errorf("apt-cache show %s: no Version", pkg)
	}
	return pkg, v, nil
}

// parseDepends returns the first "Depends:" package of apt-cache depends
// output that starts with prefix.
func parseDepends(out []byte, prefix string) string {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], prefix) {
			return f[1]
		}
	}
	return ""
}

// parseField returns the value of the first "Name: value" line.
func parseField(out []byte, name string) string {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func kernelRelease(root string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if err != nil {
		return "", fmt.Errorf("kernel package: %w", err)
	}
	if len(ents) != 1 {
		return "", fmt.Errorf("kernel package has %d module directories, want 1", len(ents))
	}
	return ents[0].Name(), nil
}

// loadKernel reads an unpacked kernel's stamp file and checks its image.
func loadKernel(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, "meshcrypt-kernel"))
	if err != nil {
		return nil, err
	}
	k := &Kernel{Dir: dir}
	for line := range strings.Lines(string(b)) {
		key, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch key {
		case "package":
			k.Package = v
		case "version":
			k.Version = v
		case "release":
			k.Release = v
		case "selector":
			k.Selector = v
		}
	}
	if k.Selector == "" { // cached before kernels had selectors: the default one
		k.Selector = DefaultKernelMeta
	}
	if k.Release == "" {
		return nil, fmt.Errorf("%s: no release in the stamp", dir)
	}
	if _, err := os.Stat(k.Image()); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(k.ModulesDir(), "modules.dep")); err != nil {
		return nil, err
	}
	return k, nil
}

// newestCached returns the most recently unpacked kernel in kdir of
// package pkg or, when pkg is "", fetched for selector.
func newestCached(kdir, pkg, selector string) (*Kernel, error) {
	ents, err := os.ReadDir(kdir)
	if err != nil {
		return nil, fmt.Errorf("no cached kernel: %w", err)
	}
	type cand struct {
		k   *Kernel
		mod int64
	}
	var cs []cand
	for _, e := range ents {
		k, err := loadKernel(filepath.Join(kdir, e.Name()))
		if err != nil || (pkg != "" && k.Package != pkg) || (pkg == "" && k.Selector != selector) {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		cs = append(cs, cand{k, info.ModTime().UnixNano()})
	}
	if len(cs) == 0 {
		return nil, fmt.Errorf("no cached kernel for %s in %s", cmp.Or(pkg, selector), kdir)
	}
	slices.SortFunc(cs, func(a, b cand) int { return cmp.Compare(b.mod, a.mod) })
	return cs[0].k, nil
}

// run runs a command and returns its stdout; errors carry its stderr.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

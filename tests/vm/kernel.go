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
	"time"
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
	// Release), e.g. linux-image-cloud-amd64@trixie, or the package itself
	// when KernelOptions.Package named it.
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
	// Meta depends on, except that for the default kernel (Meta and Release
	// both "") $MESHCRYPT_VM_KERNEL_PACKAGE, when set, names it.
	Package string
	// Meta is the metapackage whose dependency names the kernel when
	// Package is ""; "" means DefaultKernelMeta.
	Meta string
	// Release is a Debian release other than the machine's to take the
	// kernel from, e.g. "trixie" for Debian's 6.12 on a bookworm machine.
	// apt then reads that release and its security suite from Debian's
	// archive (DebianMirror) through an apt state of its own under
	// CacheDir/apt/<Release> (sources, package lists, updated by
	// FetchKernel), and never through the machine's sources: there a
	// newer release would offer to upgrade the whole system. "" means the
	// machine's own apt.
	Release string
	// CacheDir holds unpacked kernels keyed by package and version; ""
	// means DefaultCacheDir().
	CacheDir string
	// Logger receives progress; nil discards.
	Logger *slog.Logger
}

// selector names what opts asks apt for: "linux-image-cloud-amd64" or
// "linux-image-cloud-amd64@trixie". The cache records it with each kernel,
// so that without apt the fallback picks a kernel of the same series.
func (opts KernelOptions) selector() string {
	s := cmp.Or(opts.Meta, DefaultKernelMeta)
	if opts.Release != "" {
		s += "@" + opts.Release
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
// was fetched for the same package, or the same metapackage and release.
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
	if pkg == "" && opts.Meta == "" && opts.Release == "" {
		pkg = os.Getenv("MESHCRYPT_VM_KERNEL_PACKAGE")
	}
	sel := opts.selector()
	meta := cmp.Or(opts.Meta, DefaultKernelMeta)
	if pkg != "" {
		// A kernel named by its package is of no metapackage's series.
		sel = pkg
	}
	apt := aptConfig{}
	if opts.Release != "" {
		apt = aptConfig{dir: filepath.Join(cache, "apt", opts.Release), release: opts.Release}
	}
	// A private apt state is updated when its lists are missing or a day
	// old, and once more when the version they name has left the archive.
	updated := false
	if apt.stale() {
		if err := apt.update(ctx); err != nil {
			log.Warn("cannot update the package lists", "release", opts.Release, "error", err)
		}
		updated = true
	}
	name := pkg
	pkg, version, err := resolveKernel(ctx, apt, name, meta)
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
	_, err = run(ctx, tmp, "apt-get", apt.args("download", "-q", pkg+"="+version)...)
	if err != nil && apt.dir != "" && !updated {
		if uerr := apt.update(ctx); uerr != nil {
			return nil, fmt.Errorf("download %s=%s: %w", pkg, version, errors.Join(err, uerr))
		}
		if pkg, version, err = resolveKernel(ctx, apt, name, meta); err != nil {
			return nil, err
		}
		dir = filepath.Join(kdir, pkg+"_"+version)
		if k, err := loadKernel(dir); err == nil {
			return k, nil
		}
		_, err = run(ctx, tmp, "apt-get", apt.args("download", "-q", pkg+"="+version)...)
	}
	if err != nil {
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
	// Packages of merged-/usr releases (trixie) ship their modules in
	// usr/lib/modules; the cache keeps one layout, lib/modules, where
	// bookworm's depmod looks.
	if usrMods := filepath.Join(unpacked, "usr", "lib", "modules"); isDir(usrMods) && !isDir(filepath.Join(unpacked, "lib", "modules")) {
		if err := os.MkdirAll(filepath.Join(unpacked, "lib"), 0o755); err != nil {
			return nil, fmt.Errorf("kernel cache: %w", err)
		}
		if err := os.Rename(usrMods, filepath.Join(unpacked, "lib", "modules")); err != nil {
			return nil, fmt.Errorf("kernel cache: %w", err)
		}
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
// pkg, or else the linux-image package that the metapackage meta depends
// on.
func resolveKernel(ctx context.Context, apt aptConfig, pkg, meta string) (string, string, error) {
	if pkg == "" {
		out, err := run(ctx, "", "apt-cache", apt.args("depends", meta)...)
		if err != nil {
			return "", "", err
		}
		pkg = parseDepends(out, "linux-image-")
		if pkg == "" {
			return "", "", fmt.Errorf("apt-cache depends %s names no linux-image package", meta)
		}
	}
	out, err := run(ctx, "", "apt-cache", apt.args("show", "--no-all-versions", pkg)...)
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

// DebianMirror is the archive a private apt state (KernelOptions.Release)
// reads; its security suites come from DebianSecurityMirror.
const (
	DebianMirror         = "http://deb.debian.org/debian"
	DebianSecurityMirror = "http://deb.debian.org/debian-security"
)

// debianKeyring verifies Debian's archive; debian-archive-keyring on
// bookworm holds the keys of trixie too.
const debianKeyring = "/usr/share/keyrings/debian-archive-keyring.gpg"

// aptListsMaxAge is how old a private apt state's package lists may get
// before FetchKernel updates them: a security suite replaces its kernel
// within weeks, and the archive then drops the old version.
const aptListsMaxAge = 24 * time.Hour

// aptConfig is the apt that FetchKernel asks: the machine's (dir == ""), or
// a private state in dir for another release, which reads only its own
// sources and package lists.
type aptConfig struct {
	dir, release string
}

// args returns args preceded by the options that select the private state.
func (a aptConfig) args(args ...string) []string {
	if a.dir == "" {
		return args
	}
	opts := []string{
		"-o", "Dir::Etc::SourceList=" + filepath.Join(a.dir, "sources.list"),
		"-o", "Dir::Etc::SourceParts=" + filepath.Join(a.dir, "sources.list.d"),
		"-o", "Dir::Etc::Preferences=/dev/null",
		"-o", "Dir::Etc::PreferencesParts=" + filepath.Join(a.dir, "preferences.d"),
		"-o", "Dir::State::Lists=" + filepath.Join(a.dir, "lists"),
		"-o", "Dir::Cache=" + filepath.Join(a.dir, "cache"),
	}
	return append(opts, args...)
}

// sources is the private state's sources.list: the release and its
// security suite, main only.
func (a aptConfig) sources() string {
	return fmt.Sprintf("deb [signed-by=%s] %s %s main\ndeb [signed-by=%s] %s %s-security main\n",
		debianKeyring, DebianMirror, a.release, debianKeyring, DebianSecurityMirror, a.release)
}

// stale reports whether a private state lacks package lists, has lists
// older than aptListsMaxAge, or sources that differ from what it wants.
func (a aptConfig) stale() bool {
	if a.dir == "" {
		return false
	}
	if b, err := os.ReadFile(filepath.Join(a.dir, "sources.list")); err != nil || string(b) != a.sources() {
		return true
	}
	lists, _ := filepath.Glob(filepath.Join(a.dir, "lists", "*_Packages*"))
	if len(lists) == 0 {
		return true
	}
	for _, l := range lists {
		if st, err := os.Stat(l); err != nil || time.Since(st.ModTime()) > aptListsMaxAge {
			return true
		}
	}
	return false
}

// update writes the private state's sources and runs apt-get update on it.
func (a aptConfig) update(ctx context.Context) error {
	for _, d := range []string{"sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.dir, d), 0o755); err != nil {
			return fmt.Errorf("apt state for %s: %w", a.release, err)
		}
	}
	if err := os.WriteFile(filepath.Join(a.dir, "sources.list"), []byte(a.sources()), 0o644); err != nil {
		return fmt.Errorf("apt state for %s: %w", a.release, err)
	}
	if _, err := run(ctx, "", "apt-get", a.args("update", "-q")...); err != nil {
		return fmt.Errorf("update the package lists of %s: %w", a.release, err)
	}
	// apt leaves unchanged lists with their old times: mark the update.
	now := time.Now()
	lists, _ := filepath.Glob(filepath.Join(a.dir, "lists", "*_Packages*"))
	for _, l := range lists {
		os.Chtimes(l, now, now)
	}
	return nil
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

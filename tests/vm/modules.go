package vm

import (
	"bufio"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// DefaultModules are the modules the VM loads at boot, before any test
// runs: kernel WireGuard, IPsec ESP with XFRM netlink and the AEAD
// rfc4106(gcm(aes)) (gcm, ghash and seqiv are not autoloaded when a state is
// installed: without them it fails with "function not implemented"), legacy
// tc (clsact and cls_bpf), and the links the tests build nodes from. Names
// that are built into the kernel are skipped.
var DefaultModules = []string{
	"wireguard",
	"esp4", "esp6", "xfrm_user", "xfrm_algo", "xfrm_interface",
	"gcm", "ghash_generic", "ghash_clmulni_intel", "seqiv", "echainiv", "aesni_intel", "aes_generic",
	"cls_bpf", "sch_ingress",
	"veth", "bridge", "tun", "dummy",
}

// DefaultModuleDirs are directories (below lib/modules/<release>) whose
// every module goes into the initramfs without being loaded, so that the
// kernel can autoload what a test asks for (a cipher, a qdisc) through
// /sbin/modprobe.
var DefaultModuleDirs = []string{
	"kernel/crypto",
	"kernel/arch/x86/crypto",
	"kernel/lib/crypto",
	"kernel/net/sched",
	"kernel/net/xfrm",
}

// netModules drive the virtio NIC of qemu's user networking.
var netModules = []string{"virtio_pci", "virtio_net"}

// moduleIndex is a kernel's modules.dep and modules.builtin.
type moduleIndex struct {
	deps    map[string][]string // module file (relative) -> files it needs
	byName  map[string]string   // module name -> file
	builtin map[string]bool     // names built into the kernel
}

// moduleName turns "kernel/crypto/ghash-generic.ko" into "ghash_generic",
// the name modprobe and /sys/module use.
func moduleName(file string) string {
	b := path.Base(file)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

func loadModuleIndex(modDir string) (*moduleIndex, error) {
	idx := &moduleIndex{deps: map[string][]string{}, byName: map[string]string{}, builtin: map[string]bool{}}
	f, err := os.Open(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		mod, deps, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		idx.deps[mod] = strings.Fields(deps)
		idx.byName[moduleName(mod)] = mod
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for line := range strings.Lines(string(b)) {
			if line = strings.TrimSpace(line); line != "" {
				idx.builtin[moduleName(line)] = true
			}
		}
	}
	return idx, nil
}

// moduleSet is what goes into the initramfs.
type moduleSet struct {
	load    []string // names to load at boot, in order
	builtin []string // requested names built into the kernel
	files   []string // module files, relative to the modules directory
}

// resolveModules returns the modules to load (names that are modules), the
// files they need with their dependencies, plus every module below dirs
// with its dependencies. A name that is neither a module nor built in is an
// error.
func resolveModules(modDir string, idx *moduleIndex, names, dirs []string) (*moduleSet, error) {
	set := &moduleSet{}
	want := map[string]bool{}
	var add func(file string)
	add = func(file string) {
		if want[file] {
			return
		}
		want[file] = true
		for _, d := range idx.deps[file] {
			add(d)
		}
	}
	var unknown []string
	for _, n := range names {
		n = strings.ReplaceAll(n, "-", "_")
		switch file, ok := idx.byName[n]; {
		case ok:
			if !slices.Contains(set.load, n) {
				set.load = append(set.load, n)
			}
			add(file)
		case idx.builtin[n]:
			set.builtin = append(set.builtin, n)
		default:
			unknown = append(unknown, n)
		}
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("modules %s are neither modules nor built into the kernel", strings.Join(unknown, ", "))
	}
	for _, d := range dirs {
		root := filepath.Join(modDir, d)
		err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(modDir, p)
			if _, ok := idx.deps[filepath.ToSlash(rel)]; ok && !e.IsDir() {
				add(filepath.ToSlash(rel))
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("module directory %s: %w", d, err)
		}
	}
	for f := range want {
		set.files = append(set.files, f)
	}
	slices.Sort(set.files)
	return set, nil
}

// moduleCompressions are the compressed module formats a kernel package may
// ship (CONFIG_MODULE_COMPRESS_*: Debian's 6.12 has .ko.xz, 6.1 plain .ko)
// and the Debian tool that decompresses each in place, removing the
// compressed file. Modules go into the initramfs decompressed: busybox's
// modprobe and insmod read a module and pass it to init_module as it is,
// and the guest would spend emulated time decompressing anyway.
var moduleCompressions = []struct {
	ext, tool, pkg string
	args           []string
}{
	{".ko.xz", "xz", "xz-utils", []string{"-d", "-f", "-q"}},
	{".ko.zst", "zstd", "zstd", []string{"-d", "-f", "-q", "--rm"}},
	{".ko.gz", "gzip", "gzip", []string{"-d", "-f", "-q"}},
}

// decompressBatch bounds the files per decompressor command line.
const decompressBatch = 256

// stageModules copies files (relative module paths) from the modules
// directory src to dst, decompressing compressed modules there, and
// returns the staged files' paths: a compressed module's path loses its
// compression suffix (kernel/crypto/gcm.ko.xz becomes kernel/crypto/gcm.ko).
// depmod, run on dst afterwards, writes a modules.dep naming them.
func stageModules(ctx context.Context, src, dst string, files []string) ([]string, error) {
	staged := make([]string, 0, len(files))
	pending := map[int][]string{} // index in moduleCompressions -> staged compressed files
	for _, f := range files {
		if err := copyFile(filepath.Join(src, f), filepath.Join(dst, f)); err != nil {
			return nil, fmt.Errorf("stage module %s: %w", f, err)
		}
		plain := f
		for i, c := range moduleCompressions {
			if strings.HasSuffix(f, c.ext) {
				pending[i] = append(pending[i], filepath.Join(dst, f))
				plain = strings.TrimSuffix(f, c.ext) + ".ko"
				break
			}
		}
		staged = append(staged, plain)
	}
	for i, c := range moduleCompressions {
		for batch := range slices.Chunk(pending[i], decompressBatch) {
			args := append(append(slices.Clone(c.args), "--"), batch...)
			if _, err := run(ctx, "", c.tool, args...); err != nil {
				return nil, fmt.Errorf("decompress %s modules (Debian package %s): %w", c.ext, c.pkg, err)
			}
		}
	}
	for _, f := range staged {
		if !isFile(filepath.Join(dst, f)) {
			return nil, fmt.Errorf("stage module %s: not there after decompression", f)
		}
	}
	return staged, nil
}

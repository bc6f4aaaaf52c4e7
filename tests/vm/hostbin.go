package vm

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
)

// libDirs are searched, in order, for the shared libraries a host binary
// needs (Debian's multiarch layout first).
var libDirs = []string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
	"/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// hostFiles returns the files the host program name (a path, or a name
// looked up in $PATH and the sbin directories) needs to run in the VM: the
// program itself, its ELF interpreter and every shared library it loads,
// transitively, as absolute host paths. The VM places them at the same
// paths, so the interpreter and the default library search find them.
func hostFiles(name string) ([]string, error) {
	prog, err := lookHost(name)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var files []string
	var visit func(p string) error
	visit = func(p string) error {
		if seen[p] {
			return nil
		}
		seen[p] = true
		files = append(files, p)
		f, err := elf.Open(p)
		if err != nil {
			return fmt.Errorf("read %s: %w", p, err)
		}
		defer f.Close()
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b := make([]byte, prog.Filesz)
				if _, err := prog.ReadAt(b, 0); err != nil {
					return fmt.Errorf("read interpreter of %s: %w", p, err)
				}
				if interp := string(b[:len(b)-1]); !seen[interp] {
					seen[interp] = true
					files = append(files, interp)
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("read libraries of %s: %w", p, err)
		}
		for _, lib := range libs {
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, not found in %v", p, lib, libDirs)
			}
			if err := visit(found); err != nil {
				return err
			}
		}
		return nil
	}
	if err := visit(prog); err != nil {
		return nil, err
	}
	slices.Sort(files)
	return files, nil
}

func lookHost(name string) (string, error) {
	if filepath.IsAbs(name) {
		return name, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if p := filepath.Join(d, name); isFile(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("host program %s not found", name)
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

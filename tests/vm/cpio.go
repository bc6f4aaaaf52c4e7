package vm

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
)

// Archive collects the files of an initramfs and writes them as a cpio
// archive in the "newc" format the kernel unpacks. Entries are owned by root,
// carry mtime 0 and are written sorted by path with every parent directory
// before its contents, so the same inputs give the same bytes.
//
// The zero value is an empty archive. An Archive is not safe for concurrent
// use.
type Archive struct {
	entries map[string]archiveEntry
}

type archiveEntry struct {
	mode uint32 // type and permission bits, as in the cpio header
	data []byte // contents (regular files with src == "") or link target
	src  string // file on the host to copy the contents from
	size int64  // size of src
}

const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
)

func (a *Archive) put(p string, e archiveEntry) {
	if a.entries == nil {
		a.entries = map[string]archiveEntry{}
	}
	p = cleanArchivePath(p)
	a.entries[p] = e
	for d := path.Dir(p); d != "."; d = path.Dir(d) {
		if _, ok := a.entries[d]; !ok {
			a.entries[d] = archiveEntry{mode: modeDir | 0o755}
		}
	}
}

// cleanArchivePath turns "/a//b/" into "a/b": archive paths are relative to
// the root of the initramfs.
func cleanArchivePath(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// unixPerm returns the permission bits of m with setuid, setgid and sticky
// in their Unix positions.
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}

// Dir adds a directory with permission bits perm (fs.ModeSticky for /tmp).
func (a *Archive) Dir(p string, perm fs.FileMode) {
	a.put(p, archiveEntry{mode: modeDir | unixPerm(perm)})
}

// Bytes adds a regular file with the given contents and permission bits.
func (a *Archive) Bytes(p string, data []byte, perm fs.FileMode) {
	a.put(p, archiveEntry{mode: modeFile | unixPerm(perm), data: data})
}

// Symlink adds a symbolic link at p pointing to target.
func (a *Archive) Symlink(p, target string) {
	a.put(p, archiveEntry{mode: modeLink | 0o777, data: []byte(target)})
}

// File adds the host file src (following symlinks) at p with its own
// permission bits; its contents are read when the archive is written.
func (a *Archive) File(p, src string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("add %s: %w", p, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("add %s: %s is not a regular file", p, src)
	}
	a.put(p, archiveEntry{mode: modeFile | unixPerm(st.Mode()), src: src, size: st.Size()})
	return nil
}

// Tree adds the regular files, directories and symlinks below the host
// directory src at p.
func (a *Archive) Tree(p, src string) error {
	return fs.WalkDir(os.DirFS(src), ".", func(rel string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		dst := path.Join(p, rel)
		full := path.Join(src, rel)
		switch {
		case d.IsDir():
			a.Dir(dst, 0o755)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(full)
			if err != nil {
				return err
			}
			a.Symlink(dst, target)
		case d.Type().IsRegular():
			return a.File(dst, full)
		}
		return nil
	})
}

// Paths returns the archive's paths in the order they are written.
func (a *Archive) Paths() []string {
	ps := make([]string, 0, len(a.entries))
	for p := range a.entries {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	return ps
}

// Size returns the total size of the regular files' contents.
func (a *Archive) Size() int64 {
	var n int64
	for _, e := range a.entries {
		if e.mode&0o170000 == modeFile {
			if e.src != "" {
				n += e.size
			} else {
				n += int64(len(e.data))
			}
		}
	}
	return n
}

// WriteTo writes the archive, trailer included, to w.
func (a *Archive) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: bufio.NewWriterSize(w, 1<<20)}
	ino := uint32(1)
	for _, p := range a.Paths() {
		e := a.entries[p]
		if err := writeEntry(cw, ino, p, e); err != nil {
			return cw.n, fmt.Errorf("write %s: %w", p, err)
		}
		ino++
	}
	if err := writeHeader(cw, 0, "TRAILER!!!", 0, 0, 1); err != nil {
		return cw.n, err
	}
	return cw.n, cw.w.(*bufio.Writer).Flush()
}

func writeEntry(w *countWriter, ino uint32, p string, e archiveEntry) error {
	nlink := uint32(1)
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	if e.src == "" {
		if err := writeHeader(w, ino, p, e.mode, int64(len(e.data)), nlink); err != nil {
			return err
		}
		if _, err := w.Write(e.data); err != nil {
			return err
		}
		return pad(w)
	}
	f, err := os.Open(e.src)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := writeHeader(w, ino, p, e.mode, e.size, nlink); err != nil {
		return err
	}
	n, err := io.Copy(w, io.LimitReader(f, e.size))
	if err != nil {
		return err
	}
	if n != e.size {
		return fmt.Errorf("%s shrank from %d to %d bytes while writing the archive", e.src, e.size, n)
	}
	return pad(w)
}

// writeHeader writes a newc header and the NUL-terminated, padded name.
func writeHeader(w *countWriter, ino uint32, name string, mode uint32, size int64, nlink uint32) error {
	if size > 0xffffffff {
		return fmt.Errorf("%s: %d bytes is too big for newc", name, size)
	}
	// magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
	// devminor, rdevmajor, rdevminor, namesize, check
	_, err := fmt.Fprintf(w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	if err != nil {
		return err
	}
	if _, err := io.WriteString(w, name+"\x00"); err != nil {
		return err
	}
	return pad(w)
}

func pad(w *countWriter) error {
	if r := w.n % 4; r != 0 {
		_, err := w.Write(make([]byte, 4-r))
		return err
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

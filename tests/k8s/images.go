package k8s

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image references of the images the harness builds itself. The agent's reference is the one
// the install manifest names (AgentImageRef reads it).
const (
	// PauseImage is containerd's sandbox image on every node.
	PauseImage = "meshcrypt.local/pause:test"
	// WorkloadImage runs tests/k8s/internal/workload: TCP and UDP echo, HTTP /dial.
	WorkloadImage = "meshcrypt.local/workload:test"
)

// ImageFile is one regular file of an image.
type ImageFile struct {
	// Path is the absolute path inside the image.
	Path string
	// Source is the file on this machine whose content it gets.
	Source string
	// Mode is the file's permission bits.
	Mode int64
}

// Image describes a single-layer image built without a registry or a Docker engine.
type Image struct {
	// Ref is the image's reference, e.g. ghcr.io/meshcrypt/meshcrypt:0.1.0.
	Ref string
	// Files are the image's regular files; parent directories are added (0755).
	Files []ImageFile
	// Dirs are extra directories with their modes (e.g. /tmp 1777).
	Dirs map[string]int64
	// Text are small files given by content (e.g. /etc/passwd), mode 0644.
	Text map[string]string
	// Entrypoint is the image's ENTRYPOINT (exec form).
	Entrypoint []string
	// User is the image's USER ("0" is root).
	User string
}

// AgentImage is the meshcrypt image as the repository's Dockerfile describes it, built from the
// binaries in binDir (meshcrypt-agent and meshcrypt, `make build`): both binaries in
// /usr/local/bin, the agent as the entrypoint, running as root, with what distroless/static
// adds that the agent could read (/etc/passwd, /tmp). tests/manifests checks that the Dockerfile
// and this description agree.
func AgentImage(ref, binDir string) Image {
	return Image{
		Ref: ref,
		Files: []ImageFile{
			{Path: "/usr/local/bin/meshcrypt-agent", Source: filepath.Join(binDir, "meshcrypt-agent"), Mode: 0o755},
			{Path: "/usr/local/bin/meshcrypt", Source: filepath.Join(binDir, "meshcrypt"), Mode: 0o755},
		},
		Dirs: map[string]int64{"/tmp": 0o1777, "/root": 0o700},
		Text: map[string]string{
			"/etc/passwd": "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
			"/etc/group":  "root:x:0:\nnobody:x:65534:\n",
		},
		Entrypoint: []string{"/usr/local/bin/meshcrypt-agent"},
		User:       "0",
	}
}

// programImage is an image holding one static program as /PROGRAM, its entrypoint.
func programImage(ref, bin string) Image {
	p := "/" + filepath.Base(bin)
	return Image{
		Ref:        ref,
		Files:      []ImageFile{{Path: p, Source: bin, Mode: 0o755}},
		Entrypoint: []string{p},
		User:       "0",
	}
}

// layerTar returns the image's files as one uncompressed tar layer.
func (im Image) layerTar() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	dirs := map[string]int64{}
	addParents := func(p string) {
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := dirs[d]; !ok {
				dirs[d] = 0o755
			}
		}
	}
	for d, m := range im.Dirs {
		dirs[d] = m
		addParents(d)
	}
	for _, f := range im.Files {
		addParents(f.Path)
	}
	for p := range im.Text {
		addParents(p)
	}
	names := make([]string, 0, len(dirs))
	for d := range dirs {
		names = append(names, d)
	}
	slices.Sort(names) // parents before children
	for _, d := range names {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: dirs[d], ModTime: mtime}); err != nil {
			return nil, err
		}
	}
	texts := make([]string, 0, len(im.Text))
	for p := range im.Text {
		texts = append(texts, p)
	}
	slices.Sort(texts)
	for _, p := range texts {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: 0o644, Size: int64(len(im.Text[p])), ModTime: mtime}); err != nil {
			return nil, err
		}
		if _, err := io.WriteString(tw, im.Text[p]); err != nil {
			return nil, err
		}
	}
	for _, f := range im.Files {
		b, err := os.ReadFile(f.Source)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.Ref, err)
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(f.Path, "/"), Mode: f.Mode, Size: int64(len(b)), ModTime: mtime}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteTarball builds the image and writes it as a `docker save` tarball to out, which
// `ctr images import` reads.
func (im Image) WriteTarball(out string) error {
	data, err := im.layerTar()
	if err != nil {
		return fmt.Errorf("build image %s: %w", im.Ref, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
	if err != nil {
		return fmt.Errorf("build image %s: layer: %w", im.Ref, err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("build image %s: %w", im.Ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("build image %s: %w", im.Ref, err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = runtime.GOARCH
	cf.OS = "linux"
	cf.Created = v1.Time{Time: time.Unix(0, 0)}
	cf.Config.Entrypoint = slices.Clone(im.Entrypoint)
	cf.Config.User = im.User
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return fmt.Errorf("build image %s: config: %w", im.Ref, err)
	}
	tag, err := name.NewTag(im.Ref)
	if err != nil {
		return fmt.Errorf("build image %s: %w", im.Ref, err)
	}
	if err := tarball.WriteToFile(out, tag, img); err != nil {
		return fmt.Errorf("write image %s: %w", im.Ref, err)
	}
	return nil
}

// buildStatic builds a static (CGO_ENABLED=0) binary of the package pkg (relative to the
// module root) into dir.
func buildStatic(ctx context.Context, root, pkg, dir string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w\n%s", pkg, err, b)
	}
	return out, nil
}

// importImage loads a tarball into a containerd's k8s.io namespace, where the CRI finds it.
func importImage(ctx context.Context, ctr, sock, tarPath string) error {
	cmd := exec.CommandContext(ctx, ctr, "-a", sock, "-n", "k8s.io", "images", "import", tarPath)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ctr images import %s: %w\n%s", filepath.Base(tarPath), err, b)
	}
	return nil
}

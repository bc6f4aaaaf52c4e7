package manifests

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/tests/k8s"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	line  int
	cmd   string // upper case: FROM, COPY, RUN, ...
	args  string // the rest, as written
	stage string // the stage it belongs to (FROM ... AS name, else its index)
}

func parseDockerfile(t *testing.T, data string) []instruction {
	t.Helper()
	var out []instruction
	var cur strings.Builder
	start, stage := 0, ""
	stages := 0
	for i, l := range strings.Split(data, "\n") {
		trim := strings.TrimSpace(l)
		if cur.Len() == 0 && (trim == "" || strings.HasPrefix(trim, "#")) {
			continue
		}
		if cur.Len() == 0 {
			start = i + 1
		}
		if strings.HasSuffix(trim, "\\") {
			cur.WriteString(strings.TrimSuffix(trim, "\\") + " ")
			continue
		}
		cur.WriteString(trim)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		cur.Reset()
		in := instruction{line: start, cmd: strings.ToUpper(cmd), args: strings.TrimSpace(args)}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			stage = strings.Repeat("#", stages+1) // unnamed: #, ##, ...
			if len(f) >= 3 && strings.EqualFold(f[len(f)-2], "AS") {
				stage = f[len(f)-1]
			}
			stages++
		}
		in.stage = stage
		out = append(out, in)
	}
	return out
}

// flagsAndWords splits COPY/ADD arguments into --flags and the remaining words.
func flagsAndWords(args string) (map[string]string, []string) {
	flags := map[string]string{}
	var words []string
	for _, f := range strings.Fields(args) {
		if strings.HasPrefix(f, "--") && len(words) == 0 {
			k, v, _ := strings.Cut(strings.TrimPrefix(f, "--"), "=")
			flags[k] = v
			continue
		}
		words = append(words, f)
	}
	return flags, words
}

// TestDockerfile checks what can be checked without a Docker engine: the build stage copies
// existing sources that hold every package the binaries need, builds existing main packages
// statically, and the final image's entrypoint is a binary the build produced.
func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile(path(t, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	ins := parseDockerfile(t, string(data))
	var froms []instruction
	for _, in := range ins {
		if in.cmd == "FROM" {
			froms = append(froms, in)
		}
	}
	if len(froms) < 2 {
		t.Fatalf("%d stages, want a build stage and a final one", len(froms))
	}
	final := froms[len(froms)-1]
	// The builder's Go is the module's (go.mod's go line, major.minor).
	gomod, err := os.ReadFile(path(t, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod)
	if goVersion == nil || !strings.Contains(froms[0].args, "golang:"+string(goVersion[1])) {
		t.Errorf("line %d: build stage %q, want golang:%s (go.mod)", froms[0].line, froms[0].args, goVersion[1])
	}
	if base := strings.Fields(final.args)[0]; !strings.HasPrefix(base, "gcr.io/distroless/static") && !strings.HasPrefix(base, "debian:bookworm-slim") {
		t.Errorf("line %d: final image %s, want distroless/static or debian:bookworm-slim", final.line, base)
	}

	var copied []string              // context paths copied into the build stage
	built := map[string]string{}     // binary path in the build stage -> package
	installed := map[string]string{} // path in the final image -> binary path in the build stage
	var entrypoint []string
	for _, in := range ins {
		switch in.cmd {
		case "COPY", "ADD":
			flags, words := flagsAndWords(in.args)
			if len(words) < 2 {
				t.Errorf("line %d: %s %s: want sources and a destination", in.line, in.cmd, in.args)
				continue
			}
			srcs, dst := words[:len(words)-1], words[len(words)-1]
			if from, ok := flags["from"]; ok {
				for _, s := range srcs {
					if _, ok := built[s]; !ok || from != froms[0].stage {
						t.Errorf("line %d: COPY --from=%s %s: not a binary the build stage produces (%v)", in.line, from, s, keys(built))
					}
					if strings.HasSuffix(dst, "/") {
						installed[dst+filepath.Base(s)] = s
					} else {
						installed[dst] = s
					}
				}
				continue
			}
			for _, s := range srcs {
				clean := filepath.Clean(s)
				if filepath.IsAbs(clean) || strings.HasPrefix(clean, "..") {
					t.Errorf("line %d: %s source %s is outside the build context", in.line, in.cmd, s)
					continue
				}
				if _, err := os.Stat(path(t, clean)); err != nil {
					t.Errorf("line %d: %s source %s: %v", in.line, in.cmd, s, err)
				}
				copied = append(copied, clean)
			}
		case "RUN":
			if !strings.Contains(in.args, "go build") {
				continue
			}
			for _, want := range []string{"CGO_ENABLED=0", "-trimpath"} {
				if !strings.Contains(in.args, want) {
					t.Errorf("line %d: go build without %s", in.line, want)
				}
			}
			out := regexp.MustCompile(`-o (\S+)`).FindStringSubmatch(in.args)
			if out == nil || !strings.HasSuffix(out[1], "/") {
				t.Errorf("line %d: go build -o must name a directory (ending in /)", in.line)
				continue
			}
			pkgs := regexp.MustCompile(`(?:^|\s)(\./\S+)`).FindAllStringSubmatch(in.args, -1)
			for _, p := range pkgs {
				built[out[1]+filepath.Base(p[1])] = p[1]
			}
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.args), &entrypoint); err != nil {
				t.Errorf("line %d: ENTRYPOINT is not in exec (JSON) form: %v", in.line, err)
			}
			if in.stage != final.stage {
				t.Errorf("line %d: ENTRYPOINT outside the final stage", in.line)
			}
		case "USER":
			t.Errorf("line %d: USER: the agent runs as root (see the comment in the Dockerfile)", in.line)
		}
	}
	if len(built) == 0 {
		t.Fatal("no go build in the Dockerfile")
	}
	// The packages built exist and are commands.
	var pkgs []string
	for _, p := range built {
		pkgs = append(pkgs, p)
	}
	slices.Sort(pkgs)
	cmd := exec.Command("go", append([]string{"list", "-f", "{{.ImportPath}} {{.Name}}"}, pkgs...)...)
	cmd.Dir = root(t)
	outb, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list %v: %v\n%s", pkgs, err, outb)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(outb)), "\n") {
		if !strings.HasSuffix(l, " main") {
			t.Errorf("go build in the Dockerfile names %s, not a command", l)
		}
	}
	// The sources copied hold every package of this module the commands import.
	cmd = exec.Command("go", append([]string{"list", "-deps", "-f", "{{if .Module}}{{if .Module.Main}}{{.Dir}}{{end}}{{end}}"}, pkgs...)...)
	cmd.Dir = root(t)
	outb, err = cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dir := range strings.Fields(string(outb)) {
		rel, err := filepath.Rel(root(t), dir)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(copied, func(c string) bool { return rel == c || strings.HasPrefix(rel, c+"/") }) {
			t.Errorf("package directory %s is not copied into the build stage", rel)
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if !slices.Contains(copied, f) {
			t.Errorf("%s is not copied into the build stage", f)
		}
	}
	// The entrypoint is the agent, as built.
	if len(entrypoint) == 0 {
		t.Fatal("no ENTRYPOINT")
	}
	bin, ok := installed[entrypoint[0]]
	if !ok {
		t.Fatalf("ENTRYPOINT %s is not a file copied from the build stage (%v)", entrypoint[0], keys(installed))
	}
	if built[bin] != "./cmd/meshcrypt-agent" {
		t.Errorf("ENTRYPOINT %s is %s, want ./cmd/meshcrypt-agent", entrypoint[0], built[bin])
	}
	// Both binaries are in the image (docker run --entrypoint meshcrypt ... runs the CLI).
	if len(installed) != len(built) {
		t.Errorf("image holds %v, build produces %v", keys(installed), keys(built))
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestDockerfileMatchesHarnessImage checks that the agent image the real-cluster tier builds
// without a Docker engine (tests/k8s.AgentImage) is the image the Dockerfile describes: the
// same binaries (by the package that builds them) at the same paths, the same entrypoint, the
// same user (the Dockerfile sets none: distroless/static's default, root).
func TestDockerfileMatchesHarnessImage(t *testing.T) {
	data, err := os.ReadFile(path(t, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	ins := parseDockerfile(t, string(data))
	final := ""
	for _, in := range ins {
		if in.cmd == "FROM" {
			final = in.stage
		}
	}
	built := map[string]string{}    // build output path -> binary name
	inDocker := map[string]string{} // path in the final image -> binary name
	var entrypoint []string
	user := "0"
	for _, in := range ins {
		switch {
		case in.cmd == "RUN" && strings.Contains(in.args, "go build"):
			out := regexp.MustCompile(`-o (\S+/)`).FindStringSubmatch(in.args)
			if out == nil {
				t.Fatalf("line %d: go build -o DIR/ expected", in.line)
			}
			for _, p := range regexp.MustCompile(`(?:^|\s)(\./\S+)`).FindAllStringSubmatch(in.args, -1) {
				built[out[1]+filepath.Base(p[1])] = filepath.Base(p[1])
			}
		case in.cmd == "COPY" && in.stage == final:
			_, words := flagsAndWords(in.args)
			srcs, dst := words[:len(words)-1], words[len(words)-1]
			for _, s := range srcs {
				p := dst
				if strings.HasSuffix(dst, "/") {
					p = dst + filepath.Base(s)
				}
				inDocker[p] = built[s]
			}
		case in.cmd == "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.args), &entrypoint); err != nil {
				t.Fatalf("line %d: %v", in.line, err)
			}
		case in.cmd == "USER" && in.stage == final:
			user = in.args
		}
	}
	im := k8s.AgentImage("ghcr.io/meshcrypt/meshcrypt:test", "/nonexistent/bin")
	inGo := map[string]string{}
	for _, f := range im.Files {
		inGo[f.Path] = filepath.Base(f.Source)
		if f.Mode&0o111 == 0 {
			t.Errorf("harness image: %s is not executable (mode %o)", f.Path, f.Mode)
		}
	}
	if diff := cmp.Diff(inDocker, inGo); diff != "" {
		t.Errorf("binaries by path: Dockerfile (-) and tests/k8s.AgentImage (+) differ:\n%s", diff)
	}
	if diff := cmp.Diff(entrypoint, im.Entrypoint); diff != "" {
		t.Errorf("ENTRYPOINT: Dockerfile (-) and tests/k8s.AgentImage (+) differ:\n%s", diff)
	}
	if im.User != user {
		t.Errorf("user: Dockerfile %q, tests/k8s.AgentImage %q", user, im.User)
	}
}

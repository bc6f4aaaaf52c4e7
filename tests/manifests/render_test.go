package manifests

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/releaseutil"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files and manifests/install/meshcrypt.yaml")

// Paths relative to the repository root.
const (
	chartDir       = "manifests/helm/meshcrypt"
	crdDir         = "manifests/crds"
	rbacFile       = "manifests/rbac/agent.yaml"
	admissionDir   = "manifests/admission"
	installFile    = "manifests/install/meshcrypt.yaml"
	installValues  = "manifests/install/values.yaml"
	defaultGolden  = "tests/manifests/testdata/default.golden.yaml"
	allValuesFile  = "tests/manifests/testdata/all-values.yaml"
	agentNamespace = "meshcrypt"
	releaseName    = "meshcrypt"
)

// root returns the repository root (two levels up from this package).
func root(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "..", "..")
}

func path(t testing.TB, rel string) string { return filepath.Join(root(t), rel) }

// renderOptions say how to render the chart.
type renderOptions struct {
	values    map[string]any // user values (like -f values.yaml); nil for the defaults
	namespace string         // default agentNamespace
	service   string         // .Release.Service; default "Helm"
}

// render renders the chart as `helm template` does: values coalesced with the chart's and
// validated against values.schema.json, templates executed by Helm's engine, NOTES.txt
// left out, manifests in Helm's install order, each preceded by "# Source: <template>".
func render(t testing.TB, opts renderOptions) (string, error) {
	t.Helper()
	chrt, err := loader.LoadDir(path(t, chartDir))
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	if opts.namespace == "" {
		opts.namespace = agentNamespace
	}
	vals, err := chartutil.ToRenderValues(chrt, opts.values, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: opts.namespace, Revision: 1, IsInstall: true,
	}, nil)
	if err != nil {
		return "", err
	}
	if opts.service != "" {
		vals["Release"].(map[string]any)["Service"] = opts.service
	}
	files, err := engine.Render(chrt, vals)
	if err != nil {
		return "", err
	}
	for name := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, nil, releaseutil.InstallOrder)
	if err != nil {
		return "", err
	}
	if len(hooks) > 0 {
		t.Fatalf("the chart has %d hooks; the plain install would not run them", len(hooks))
	}
	var b strings.Builder
	for _, m := range manifests {
		fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", m.Name, strings.TrimSpace(m.Content))
	}
	return b.String(), nil
}

// mustRender is render that fails the test on error.
func mustRender(t testing.TB, opts renderOptions) string {
	t.Helper()
	out, err := render(t, opts)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	return out
}

// readValues reads a values file.
func readValues(t testing.TB, rel string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	return v
}

// object is one parsed YAML document.
type object struct {
	source string // where it came from, for messages
	obj    *unstructured.Unstructured
}

func (o object) key() string {
	return fmt.Sprintf("%s %s/%s", o.obj.GetKind(), o.obj.GetNamespace(), o.obj.GetName())
}

// parseObjects splits YAML into objects, strictly: a duplicate key, or a document without
// apiVersion, kind or name, is an error. Empty documents are skipped.
func parseObjects(t testing.TB, source string, data []byte) []object {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", source, err)
		}
		j, err := yaml.YAMLToJSONStrict(doc)
		if err != nil {
			t.Fatalf("%s (document %d): %v", source, i, err)
		}
		if bytes.Equal(bytes.TrimSpace(j), []byte("null")) {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(j, &m); err != nil {
			t.Fatalf("%s (document %d): %v", source, i, err)
		}
		o := object{source: fmt.Sprintf("%s (document %d)", source, i), obj: &unstructured.Unstructured{Object: m}}
		if o.obj.GetAPIVersion() == "" || o.obj.GetKind() == "" || o.obj.GetName() == "" {
			t.Fatalf("%s: apiVersion, kind or metadata.name missing", o.source)
		}
		out = append(out, o)
	}
	return out
}

// readObjects parses every *.yaml file of dir (or the file itself), sorted.
func readObjects(t testing.TB, rel string) []object {
	t.Helper()
	p := path(t, rel)
	files := []string{p}
	if st, err := os.Stat(p); err != nil {
		t.Fatal(err)
	} else if st.IsDir() {
		files, _ = filepath.Glob(filepath.Join(p, "*.yaml"))
		slices.Sort(files)
	}
	var out []object
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root(t), f)
		out = append(out, parseObjects(t, rel, b)...)
	}
	return out
}

// golden compares got with the file rel, or rewrites it with -update.
func golden(t *testing.T, rel, got string) {
	t.Helper()
	p := path(t, rel)
	if *update {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test ./tests/manifests -update to create it)", err)
	}
	if string(want) != got {
		t.Errorf("%s is stale; run go test ./tests/manifests -update and review the diff:\n%s", rel, lineDiff(string(want), got))
	}
}

// lineDiff shows the first differing lines of two texts.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			return fmt.Sprintf("line %d:\n-%s\n+%s", i+1, wl, gl)
		}
	}
	return "(no difference)"
}

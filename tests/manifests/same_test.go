package manifests

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// crdFiles lists the *.yaml file names of dir, sorted.
func crdFiles(t testing.TB, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(path(t, dir), "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, filepath.Base(f))
	}
	slices.Sort(names)
	if len(names) == 0 {
		t.Fatalf("no *.yaml in %s", dir)
	}
	return names
}

// TestChartCRDs: the chart's crds/ are byte-for-byte the generated manifests/crds.
func TestChartCRDs(t *testing.T) {
	chartCRDs := chartDir + "/crds"
	want, got := crdFiles(t, crdDir), crdFiles(t, chartCRDs)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("CRD files of the chart (-manifests/crds +chart):\n%s\ncopy them: cp %s/*.yaml %s/", diff, crdDir, chartCRDs)
	}
	for _, f := range want {
		a, err := os.ReadFile(path(t, crdDir+"/"+f))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(path(t, chartCRDs+"/"+f))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s/%s differs from %s/%s: cp %s/*.yaml %s/", chartCRDs, f, crdDir, f, crdDir, chartCRDs)
		}
	}
}

// TestChartRBAC: the chart's ServiceAccount, roles and bindings are those of
// manifests/rbac/agent.yaml (labels aside). The Namespace there is left to
// `helm install --namespace meshcrypt` (or the plain install).
func TestChartRBAC(t *testing.T) {
	want := map[string]map[string]any{}
	for _, o := range readObjects(t, rbacFile) {
		if o.obj.GetKind() == "Namespace" {
			continue
		}
		want[o.key()] = stripMeta(o)
	}
	got := map[string]map[string]any{}
	for _, o := range parseObjects(t, "chart", []byte(mustRender(t, renderOptions{}))) {
		switch o.obj.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			got[o.key()] = stripMeta(o)
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("RBAC (-%s +chart):\n%s", rbacFile, diff)
	}
}

// TestChartAdmission: the chart's admission policy and binding are those of
// manifests/admission (labels aside).
func TestChartAdmission(t *testing.T) {
	want := map[string]map[string]any{}
	for _, o := range readObjects(t, admissionDir) {
		want[o.key()] = stripMeta(o)
	}
	got := map[string]map[string]any{}
	for _, o := range parseObjects(t, "chart", []byte(mustRender(t, renderOptions{}))) {
		switch o.obj.GetKind() {
		case "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding":
			got[o.key()] = stripMeta(o)
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("admission (-%s +chart):\n%s", admissionDir, diff)
	}
}

// stripMeta is the object without labels and annotations, which only the chart sets.
func stripMeta(o object) map[string]any {
	c := o.obj.DeepCopy()
	c.SetLabels(nil)
	c.SetAnnotations(nil)
	return c.Object
}

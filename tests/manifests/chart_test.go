package manifests

import (
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/meshcrypt/meshcrypt/pkg/metrics"
)

// TestChartDefault pins the default render in a golden file and checks what the rest of
// meshcrypt relies on.
func TestChartDefault(t *testing.T) {
	out := mustRender(t, renderOptions{})
	golden(t, defaultGolden, out)
	objs := parseObjects(t, "default render", []byte(out))
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.key())
	}
	want := []string{
		"ServiceAccount meshcrypt/meshcrypt-agent",
		"ClusterRole /meshcrypt-agent",
		"ClusterRoleBinding /meshcrypt-agent",
		"Role meshcrypt/meshcrypt-agent",
		"RoleBinding meshcrypt/meshcrypt-agent",
		"Service meshcrypt/meshcrypt-agent-metrics",
		"DaemonSet meshcrypt/meshcrypt-agent",
		"MeshConfig /default",
		"ValidatingAdmissionPolicy /meshcrypt-meshnode-owner",
		"ValidatingAdmissionPolicyBinding /meshcrypt-meshnode-owner",
	}
	if diff := cmp.Diff(want, kinds); diff != "" {
		t.Errorf("objects (-want +got):\n%s", diff)
	}
	ds := find(t, objs, "DaemonSet")
	// The metrics port of the chart is the package's default, so probes hit the server.
	ports := nested[[]any](t, ds, "spec", "template", "spec", "containers", "0", "ports")
	if got := ports[0].(map[string]any)["containerPort"]; fmt.Sprint(got) != fmt.Sprint(metrics.DefaultPort) {
		t.Errorf("metrics containerPort %v, want metrics.DefaultPort %d", got, metrics.DefaultPort)
	}
	for _, probe := range []struct{ name, path string }{{"livenessProbe", metrics.PathHealthz}, {"readinessProbe", metrics.PathReadyz}} {
		if got := nested[string](t, ds, "spec", "template", "spec", "containers", "0", probe.name, "httpGet", "path"); got != probe.path {
			t.Errorf("%s path %q, want %q", probe.name, got, probe.path)
		}
	}
	mc := find(t, objs, "MeshConfig")
	if got := nested[string](t, mc, "spec", "encryption", "mode"); got != "Disabled" {
		t.Errorf("MeshConfig mode %q, want Disabled", got)
	}
}

// TestChartAllValues renders with every value set to something other than its default and
// checks each took effect.
func TestChartAllValues(t *testing.T) {
	all := readValues(t, allValuesFile)
	defaults := readValues(t, chartDir+"/values.yaml")
	for _, leaf := range schemaLeaves(t) {
		got, ok := lookup(all, leaf)
		if !ok {
			t.Errorf("%s does not set %s", allValuesFile, leaf)
			continue
		}
		if def, _ := lookup(defaults, leaf); reflect.DeepEqual(got, def) {
			t.Errorf("%s sets %s to its default %v", allValuesFile, leaf, got)
		}
	}
	objs := parseObjects(t, "all-values render", []byte(mustRender(t, renderOptions{values: all})))
	ds := find(t, objs, "DaemonSet")
	ctr := nested[map[string]any](t, ds, "spec", "template", "spec", "containers", "0")
	args := strings.Join(toStrings(ctr["args"]), " ")
	for _, want := range []string{
		"--cluster-name=east", "--cluster-id=255", "--wireguard-backend=kernel", "--wireguard-port=51872",
		"--wireguard-iface=mc0", "--attach-mode=tc", "--metrics-addr=:9972", "--log-format=json",
		"--log-level=debug", "--status-period=5s",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("agent args %q lack %s", args, want)
		}
	}
	js := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	pod := nested[map[string]any](t, ds, "spec", "template", "spec")
	for _, c := range []struct{ what, got, want string }{
		{"image", js(ctr["image"]), `"registry.example.com/meshcrypt:v0.2.0"`},
		{"pullPolicy", js(ctr["imagePullPolicy"]), `"Always"`},
		{"imagePullSecrets", js(pod["imagePullSecrets"]), `[{"name":"regcred"}]`},
		{"resources", js(ctr["resources"]), `{"limits":{"memory":"1Gi"},"requests":{"cpu":"200m","memory":"256Mi"}}`},
		{"tolerations", js(pod["tolerations"]), `[{"effect":"NoSchedule","key":"dedicated","operator":"Equal","value":"network"}]`},
		// Helm merges maps with the defaults (kubernetes.io/os stays unless set to null).
		{"nodeSelector", js(pod["nodeSelector"]), `{"kubernetes.io/os":"linux","meshcrypt.io/agent":"true"}`},
		{"priorityClassName", js(pod["priorityClassName"]), `"system-cluster-critical"`},
		{"capabilities", js(nested[any](t, ctr, "securityContext", "capabilities", "add")), `["NET_ADMIN","BPF","PERFMON"]`},
		// Without SYS_ADMIN, privilege escalation can be turned off too.
		{"allowPrivilegeEscalation", js(nested[any](t, ctr, "securityContext", "allowPrivilegeEscalation")), `false`},
		{"seLinuxOptions", js(nested[any](t, ctr, "securityContext", "seLinuxOptions")), `{"type":"spc_t"}`},
		{"podAnnotations", js(nested[any](t, ds, "spec", "template", "metadata", "annotations")), `{"example.com/owner":"network-team"}`},
		{"podLabels", js(nested[any](t, ds, "spec", "template", "metadata", "labels", "team")), `"network"`},
		{"metrics port", js(nested[any](t, ctr, "ports")), `[{"containerPort":9972,"name":"metrics","protocol":"TCP"},{"containerPort":51872,"name":"wireguard","protocol":"UDP"}]`},
		// backend kernel: no TUN device mounted.
		{"tun", js(strings.Contains(js(pod["volumes"]), "/dev/net/tun")), `false`},
	} {
		if c.got != c.want {
			t.Errorf("%s = %s, want %s", c.what, c.got, c.want)
		}
	}
	sa := find(t, objs, "ServiceAccount")
	if got := js(sa.Object["imagePullSecrets"]); got != `[{"name":"regcred"}]` {
		t.Errorf("ServiceAccount imagePullSecrets = %s", got)
	}
	for _, o := range objs {
		switch o.obj.GetKind() {
		case "MeshConfig":
			t.Errorf("meshConfig.create=false rendered a MeshConfig")
		case "Service":
			t.Errorf("metrics.service.enabled=false rendered a Service")
		}
	}
	// The mode reaches the MeshConfig when it is rendered.
	objs = parseObjects(t, "WireGuard render", []byte(mustRender(t, renderOptions{values: map[string]any{"encryption": map[string]any{"mode": "WireGuard"}}})))
	if got := nested[string](t, find(t, objs, "MeshConfig"), "spec", "encryption", "mode"); got != "WireGuard" {
		t.Errorf("MeshConfig mode %q, want WireGuard", got)
	}
}

// TestChartMeshConfigValues checks that the encryption values reach the MeshConfig.
func TestChartMeshConfigValues(t *testing.T) {
	for _, tt := range []struct{ values, want string }{
		{"{encryption: {mode: IPsec, strict: true, ipsecRotationGracePeriod: 30s, keyRotationInterval: 720h}, clusterName: east, clusterID: 7}",
			`{"cluster":{"id":7,"name":"east"},"encryption":{"ipsec":{"rotationGracePeriod":"30s"},"mode":"IPsec","nodeEncryptionOptOutLabels":"node-role.kubernetes.io/control-plane","strict":true},"keyRotation":{"every":"720h"}}`},
		{`{encryption: {mode: WireGuard, nodeEncryption: true, nodeEncryptionOptOutLabels: ""}}`,
			`{"cluster":{"id":1,"name":"default"},"encryption":{"mode":"WireGuard","nodeEncryption":true,"nodeEncryptionOptOutLabels":""}}`},
	} {
		var vals map[string]any
		if err := yaml.Unmarshal([]byte(tt.values), &vals); err != nil {
			t.Fatal(err)
		}
		mc := find(t, parseObjects(t, "render", []byte(mustRender(t, renderOptions{values: vals}))), "MeshConfig")
		got, _ := json.Marshal(nested[any](t, mc, "spec"))
		if string(got) != tt.want {
			t.Errorf("values %s: MeshConfig spec = %s, want %s", tt.values, got, tt.want)
		}
	}
}

// TestChartInvalidValues: values the agent would refuse, or features not built yet, fail
// the render (so helm install and helm upgrade) with a message naming the value.
func TestChartInvalidValues(t *testing.T) {
	tests := []struct {
		name      string
		values    string // YAML
		namespace string
		wantErr   []string
	}{
		{name: "clusterID 0", values: "clusterID: 0", wantErr: []string{"/clusterID", "minimum", "1"}},
		{name: "clusterID 256", values: "clusterID: 256", wantErr: []string{"/clusterID", "maximum", "255"}},
		{name: "clusterID string", values: `clusterID: "7"`, wantErr: []string{"/clusterID", "integer"}},
		{name: "clusterID fraction", values: "clusterID: 1.5", wantErr: []string{"/clusterID", "integer"}},
		{name: "unknown mode", values: "encryption: {mode: Bogus}", wantErr: []string{"/encryption/mode", "Disabled", "WireGuard"}},
		{name: "mode in lower case", values: "encryption: {mode: wireguard}", wantErr: []string{"/encryption/mode"}},
		{name: "grace period not a duration", values: "encryption: {mode: IPsec, ipsecRotationGracePeriod: soon}", wantErr: []string{"/encryption/ipsecRotationGracePeriod"}},
		{name: "unknown backend", values: "wireguard: {backend: boringtun}", wantErr: []string{"/wireguard/backend", "auto", "kernel", "userspace"}},
		{name: "unknown attach mode", values: "attachMode: xdp", wantErr: []string{"/attachMode", "tcx"}},
		{name: "port out of range", values: "wireguard: {port: 70000}", wantErr: []string{"/wireguard/port", "maximum"}},
		{name: "iface too long", values: "wireguard: {iface: meshcrypt-wireguard0}", wantErr: []string{"/wireguard/iface"}},
		{name: "cluster name not a label value", values: `clusterName: "east coast"`, wantErr: []string{"/clusterName"}},
		{name: "misspelt key", values: "encrpytion: {mode: WireGuard}", wantErr: []string{"encrpytion"}},
		{name: "misspelt nested key", values: "metrics: {prot: 9000}", wantErr: []string{"prot"}},
		{name: "extra arg without dashes", values: "extraArgs: [status-period=5s]", wantErr: []string{"/extraArgs/0"}},
		{name: "strict without a mode", values: "encryption: {strict: true}", wantErr: []string{"encryption.strict needs an encryption mode"}},
		{name: "nodeEncryption with IPsec", values: "encryption: {mode: IPsec, nodeEncryption: true}", wantErr: []string{"encryption.nodeEncryption needs mode WireGuard"}},
		{name: "cluster name not a DNS label", values: `clusterName: East`, wantErr: []string{"/clusterName"}},
		{name: "keyRotationInterval not a duration", values: "encryption: {keyRotationInterval: monthly}", wantErr: []string{"/encryption/keyRotationInterval"}},
		{name: "other namespace", values: "{}", namespace: "kube-system", wantErr: []string{"namespace meshcrypt", `not "kube-system"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var vals map[string]any
			if err := yaml.Unmarshal([]byte(tt.values), &vals); err != nil {
				t.Fatal(err)
			}
			_, err := render(t, renderOptions{values: vals, namespace: tt.namespace})
			if err == nil {
				t.Fatalf("values %s rendered", tt.values)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestInstallManifest regenerates the plain install from manifests/crds and the chart, and
// compares it with manifests/install/meshcrypt.yaml.
func TestInstallManifest(t *testing.T) {
	var b strings.Builder
	b.WriteString(installHeader)
	for _, f := range crdFiles(t, crdDir) {
		data, err := os.ReadFile(path(t, crdDir+"/"+f))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "---\n# Source: %s/%s\n%s", crdDir, f, strings.TrimPrefix(string(data), "---\n"))
	}
	b.WriteString(installNamespace)
	b.WriteString(mustRender(t, renderOptions{values: readValues(t, installValues), service: "kubectl"}))
	got := b.String()
	golden(t, installFile, got)

	objs := parseObjects(t, installFile, []byte(got))
	for _, o := range objs {
		// Re-applying the file (an upgrade) must never change the cluster's mode.
		if o.obj.GetKind() == "MeshConfig" {
			t.Errorf("%s holds a MeshConfig: re-applying it would reset the encryption mode", installFile)
		}
	}
	ns := find(t, objs, "Namespace")
	if ns.GetName() != agentNamespace || ns.GetLabels()["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace %s labels %v: want %s, enforce=privileged (host network, host paths, capabilities)", ns.GetName(), ns.GetLabels(), agentNamespace)
	}
	if got := find(t, objs, "DaemonSet").GetLabels()["app.kubernetes.io/managed-by"]; got != "kubectl" {
		t.Errorf("plain install objects are managed-by %q, want kubectl", got)
	}
}

const installHeader = `# meshcrypt, plain install:
#   kubectl apply --server-side -f manifests/install/meshcrypt.yaml
#
# GENERATED by "go test ./tests/manifests -update" from manifests/crds and the Helm chart
# manifests/helm/meshcrypt rendered with manifests/install/values.yaml. Do not edit; change
# the chart or the values and regenerate.
#
# It holds the CRDs, the namespace meshcrypt, the agent's ServiceAccount and RBAC (the rules of
# manifests/rbac/agent.yaml), the MeshNode admission policy (manifests/admission), the agent
# DaemonSet and its metrics Service. It holds no MeshConfig, so re-applying it (an upgrade)
# never changes the cluster's encryption mode: set that with
#   meshcrypt encryption enable --mode wireguard --wait
`

// installNamespace is the agent's namespace. The agent needs host networking, host paths and
// capabilities, which the baseline and restricted Pod Security levels forbid.
const installNamespace = `---
# The agent's namespace; its pods need host networking, host paths and capabilities.
apiVersion: v1
kind: Namespace
metadata:
  name: meshcrypt
  labels:
    app.kubernetes.io/name: meshcrypt
    pod-security.kubernetes.io/enforce: privileged
`

// TestValuesDocumented: every value in values.schema.json has a default in values.yaml and a
// row in docs/install.md.
func TestValuesDocumented(t *testing.T) {
	defaults := readValues(t, chartDir+"/values.yaml")
	doc, err := os.ReadFile(path(t, "docs/install.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, leaf := range schemaLeaves(t) {
		if _, ok := lookup(defaults, leaf); !ok {
			t.Errorf("values.yaml has no default for %s", leaf)
		}
		if !strings.Contains(string(doc), "| `"+leaf+"` |") {
			t.Errorf("docs/install.md has no table row for %s", leaf)
		}
	}
}

// schemaLeaves lists the dotted paths of values.schema.json's properties that have no nested
// properties (global, which Helm adds, left out).
func schemaLeaves(t testing.TB) []string {
	t.Helper()
	b, err := os.ReadFile(path(t, chartDir+"/values.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var schema map[string]any
	if err := json.Unmarshal(b, &schema); err != nil {
		t.Fatalf("values.schema.json: %v", err)
	}
	var leaves []string
	var walk func(prefix string, s map[string]any)
	walk = func(prefix string, s map[string]any) {
		props, ok := s["properties"].(map[string]any)
		if !ok {
			leaves = append(leaves, prefix)
			return
		}
		for name, sub := range props {
			if prefix == "" && name == "global" {
				continue
			}
			p := name
			if prefix != "" {
				p = prefix + "." + name
			}
			walk(p, sub.(map[string]any))
		}
	}
	walk("", schema)
	slices.Sort(leaves)
	return leaves
}

// lookup finds a dotted path in nested maps.
func lookup(m map[string]any, dotted string) (any, bool) {
	var cur any = m
	for _, k := range strings.Split(dotted, ".") {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = mm[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// find returns the only object of kind, failing the test if there is not exactly one.
func find(t testing.TB, objs []object, kind string) *unstructured.Unstructured {
	t.Helper()
	var found []*unstructured.Unstructured
	for _, o := range objs {
		if o.obj.GetKind() == kind {
			found = append(found, o.obj)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d objects of kind %s, want 1", len(found), kind)
	}
	return found[0]
}

// nested walks maps and lists (numeric keys index lists) and asserts the type at the end.
func nested[T any](t testing.TB, obj any, keys ...string) T {
	t.Helper()
	cur := obj
	if u, ok := cur.(*unstructured.Unstructured); ok {
		cur = u.Object
	}
	for _, k := range keys {
		switch c := cur.(type) {
		case map[string]any:
			cur = c[k]
		case []any:
			var i int
			if _, err := fmt.Sscan(k, &i); err != nil || i >= len(c) {
				t.Fatalf("%v: no index %s", keys, k)
			}
			cur = c[i]
		default:
			t.Fatalf("%v: %s is not in a map or list", keys, k)
		}
	}
	v, ok := cur.(T)
	if !ok {
		var zero T
		t.Fatalf("%v: %T, want %T", keys, cur, zero)
	}
	return v
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, fmt.Sprint(x))
	}
	return out
}

package controlplane

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"
)

// FieldManager is the server-side-apply field manager of ApplyYAML.
const FieldManager = "meshcrypt-controlplane"

// crdTimeout bounds the wait for a CustomResourceDefinition to be served.
const crdTimeout = time.Minute

// document is one YAML document of a manifest file.
type document struct {
	source string // file:index, for errors
	data   []byte
	obj    *unstructured.Unstructured
}

// readDocuments splits every file in paths into its non-empty YAML documents.
func readDocuments(paths []string) ([]document, error) {
	var docs []document
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for i := 0; ; i++ {
			data, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("read %s: %w", p, err)
			}
			src := fmt.Sprintf("%s (document %d)", p, i)
			var m map[string]any
			if err := yaml.Unmarshal(data, &m); err != nil {
				f.Close()
				return nil, fmt.Errorf("parse %s: %w", src, err)
			}
			if len(m) == 0 {
				continue // empty, or only comments
			}
			obj := &unstructured.Unstructured{Object: m}
			if obj.GetKind() == "" || obj.GetAPIVersion() == "" || obj.GetName() == "" {
				f.Close()
				return nil, fmt.Errorf("parse %s: apiVersion, kind or metadata.name missing", src)
			}
			docs = append(docs, document{source: src, data: bytes.Clone(data), obj: obj})
		}
		f.Close()
	}
	return docs, nil
}

// manifestFiles returns path itself if it is a file, else the *.yaml files in it, sorted.
func manifestFiles(path string) ([]string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return []string{path}, nil
	}
	files, err := filepath.Glob(filepath.Join(path, "*.yaml"))
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no *.yaml files in %s", path)
	}
	slices.Sort(files)
	return files, nil
}

// ApplyCRDs creates or updates every CustomResourceDefinition in the *.yaml files of dir
// (several documents per file allowed; any other kind is an error) and waits until each is
// Established and every served version appears in discovery. It is idempotent. After an update
// of an existing CRD the server may take a moment to serve the new schema.
func (cp *ControlPlane) ApplyCRDs(ctx context.Context, dir string) error {
	files, err := manifestFiles(dir)
	if err != nil {
		return fmt.Errorf("apply CRDs: %w", err)
	}
	docs, err := readDocuments(files)
	if err != nil {
		return fmt.Errorf("apply CRDs: %w", err)
	}
	var crds []*apiextensionsv1.CustomResourceDefinition
	for _, d := range docs {
		if gvk := d.obj.GroupVersionKind(); gvk != apiextensionsv1.SchemeGroupVersion.WithKind("CustomResourceDefinition") {
			return fmt.Errorf("apply CRDs: %s: %s is not an apiextensions.k8s.io/v1 CustomResourceDefinition", d.source, gvk)
		}
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.Unmarshal(d.data, crd); err != nil {
			return fmt.Errorf("apply CRDs: parse %s: %w", d.source, err)
		}
		crds = append(crds, crd)
	}
	cfg := cp.RESTConfig()
	client, err := apiextensionsclient.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply CRDs: %w", err)
	}
	crdClient := client.ApiextensionsV1().CustomResourceDefinitions()
	for _, crd := range crds {
		_, err := crdClient.Create(ctx, crd, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
				cur, err := crdClient.Get(ctx, crd.Name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				upd := crd.DeepCopy()
				upd.ResourceVersion = cur.ResourceVersion
				_, err = crdClient.Update(ctx, upd, metav1.UpdateOptions{})
				return err
			})
		}
		if err != nil {
			return fmt.Errorf("apply CRD %s: %w", crd.Name, err)
		}
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply CRDs: %w", err)
	}
	for _, crd := range crds {
		if err := waitCRDServed(ctx, client, disco, crd); err != nil {
			return fmt.Errorf("apply CRD %s: %w", crd.Name, err)
		}
	}
	return nil
}

// waitCRDServed waits until crd is Established and each served version lists its plural in
// discovery.
func waitCRDServed(ctx context.Context, client apiextensionsclient.Interface, disco discovery.DiscoveryInterface, crd *apiextensionsv1.CustomResourceDefinition) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, pollInterval, crdTimeout, true, func(ctx context.Context) (bool, error) {
		cur, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		established := false
		for _, c := range cur.Status.Conditions {
			switch {
			case c.Type == apiextensionsv1.NamesAccepted && c.Status == apiextensionsv1.ConditionFalse:
				return false, fmt.Errorf("names not accepted: %s", c.Message)
			case c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue:
				established = true
			}
		}
		if !established {
			last = "not Established"
			return false, nil
		}
		for _, v := range cur.Spec.Versions {
			if !v.Served {
				continue
			}
			gv := schema.GroupVersion{Group: cur.Spec.Group, Version: v.Name}.String()
			list, err := disco.ServerResourcesForGroupVersion(gv)
			if err != nil {
				last = fmt.Sprintf("discovery of %s: %v", gv, err)
				return false, nil
			}
			if !slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == cur.Spec.Names.Plural }) {
				last = fmt.Sprintf("%s not in discovery of %s", cur.Spec.Names.Plural, gv)
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait until served (%s): %w", last, err)
	}
	return nil
}

// ApplyYAML server-side applies (field manager FieldManager, forcing conflicts) every object in
// path: one file, or every *.yaml file of a directory, several documents per file allowed.
// Namespaced objects without a namespace go to "default". Objects are applied in file order;
// kinds are resolved through discovery, so a custom resource's CRD must be served already: apply
// CRDs with ApplyCRDs, which waits for that.
func (cp *ControlPlane) ApplyYAML(ctx context.Context, path string) error {
	files, err := manifestFiles(path)
	if err != nil {
		return fmt.Errorf("apply %s: %w", path, err)
	}
	docs, err := readDocuments(files)
	if err != nil {
		return fmt.Errorf("apply %s: %w", path, err)
	}
	cfg := cp.RESTConfig()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply %s: %w", path, err)
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return fmt.Errorf("apply %s: %w", path, err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disco))
	for _, d := range docs {
		gvk := d.obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if meta.IsNoMatchError(err) {
			mapper.Reset() // discovery may predate a CRD applied since
			mapping, err = mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		}
		if err != nil {
			return fmt.Errorf("apply %s: %w", d.source, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			ns := d.obj.GetNamespace()
			if ns == "" {
				ns = metav1.NamespaceDefault
				d.obj.SetNamespace(ns)
			}
			ri = dyn.Resource(mapping.Resource).Namespace(ns)
		}
		if _, err := ri.Apply(ctx, d.obj.GetName(), d.obj, metav1.ApplyOptions{FieldManager: FieldManager, Force: true}); err != nil {
			return fmt.Errorf("apply %s %s: %w", gvk.Kind, d.obj.GetName(), err)
		}
	}
	return nil
}

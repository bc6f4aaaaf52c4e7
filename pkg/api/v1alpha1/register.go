package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of every type in this package.
var GroupVersion = schema.GroupVersion{Group: "meshcrypt.io", Version: "v1alpha1"}

var (
	schemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme registers this package's types in a scheme.
	AddToScheme = schemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&MeshConfig{}, &MeshConfigList{},
		&MeshNode{}, &MeshNodeList{},
		&MeshIdentity{}, &MeshIdentityList{},
		&MeshPolicy{}, &MeshPolicyList{},
		&MeshVerification{}, &MeshVerificationList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}

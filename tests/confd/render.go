// Command render is the differential tests' reference: it renders a confd template with
// Go's own text/template and a function map re-created from confd's source, over a key
// set given as JSON, exactly as confd would. Standard library only (it builds offline).
//
//	render -keys keys.json -prefix /app -watch /upstreams,/services template.tmpl
//
// keys.json maps full etcd keys to values. Sources re-created here:
//   - kelseyhightower/confd resource/template/resource.go: setVars (prefix range read of
//     path.Join(prefix, key) for each watched key; stored as path.Join("/", TrimPrefix(k,
//     prefix))), createStageFile (template.New(base).Funcs(funcMap).ParseFiles, Execute
//     with nil data);
//   - kelseyhightower/confd resource/template/template_funcs.go: the helpers;
//   - kelseyhightower/memkv store.go: exists, get, gets, getv, getvs, ls, lsdir.
package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

// KVPair is memkv's pair.
type KVPair struct {
	Key   string
	Value string
}

// KVPairs sorts by key, as memkv's does.
type KVPairs []KVPair

func (ks KVPairs) Len() int           { return len(ks) }
func (ks KVPairs) Less(i, j int) bool { return ks[i].Key < ks[j].Key }
func (ks KVPairs) Swap(i, j int)      { ks[i], ks[j] = ks[j], ks[i] }

// Store is memkv's Store without the lock (one goroutine here).
type Store struct{ m map[string]KVPair }

func (s Store) Exists(key string) bool {
	_, err := s.Get(key)
	return err == nil
}

func (s Store) Get(key string) (KVPair, error) {
	kv, ok := s.m[key]
	if !ok {
		return kv, fmt.Errorf("key does not exist: %s", key)
	}
	return kv, nil
}

func (s Store) GetValue(key string, v ...string) (string, error) {
	kv, err := s.Get(key)
	if err != nil {
		if len(v) > 0 {
			return v[0], nil
		}
		return "", err
	}
	return kv.Value, nil
}

func (s Store) GetAll(pattern string) (KVPairs, error) {
	ks := make(KVPairs, 0)
	for _, kv := range s.m {
		m, err := filepath.Match(pattern, kv.Key)
		if err != nil {
			return nil, err
		}
		if m {
			ks = append(ks, kv)
		}
	}
	sort.Sort(ks)
	return ks, nil
}

func (s Store) GetAllValues(pattern string) ([]string, error) {
	vs := make([]string, 0)
	ks, err := s.GetAll(pattern)
	if err != nil {
		return vs, err
	}
	for _, kv := range ks {
		vs = append(vs, kv.Value)
	}
	sort.Strings(vs)
	return vs, nil
}

func (s Store) List(filePath string) []string {
	vs := make([]string, 0)
	m := make(map[string]bool)
	prefix := pathToTerms(path.Clean(filePath))
	for _, kv := range s.m {
		if kv.Key == filePath {
			m[path.Base(kv.Key)] = true
			continue
		}
		target := pathToTerms(path.Dir(kv.Key))
		if samePrefixTerms(target, prefix) {
			m[strings.Split(stripKey(kv.Key, filePath), "/")[0]] = true
		}
	}
	for k := range m {
		vs = append(vs, k)
	}
	sort.Strings(vs)
	return vs
}

func (s Store) ListDir(filePath string) []string {
	vs := make([]string, 0)
	m := make(map[string]bool)
	prefix := pathToTerms(path.Clean(filePath))
	for _, kv := range s.m {
		if strings.HasPrefix(kv.Key, filePath) {
			items := pathToTerms(path.Dir(kv.Key))
			if samePrefixTerms(prefix, items) && (len(items)-len(prefix) >= 1) {
				m[items[len(prefix):][0]] = true
			}
		}
	}
	for k := range m {
		vs = append(vs, k)
	}
	sort.Strings(vs)
	return vs
}

func stripKey(key, prefix string) string {
	return strings.TrimPrefix(strings.TrimPrefix(key, prefix), "/")
}

func pathToTerms(filePath string) []string {
	return strings.Split(path.Clean(filePath), "/")
}

func samePrefixTerms(left, right []string) bool {
	l := len(left)
	if len(left) > len(right) {
		l = len(right)
	}
	for i := 0; i < l; i++ {
		if left[i] != right[i] {
			return false
		}
	}
	return true
}

// confd's helpers (template_funcs.go).

func getenv(key string, v ...string) string {
	defaultValue := ""
	if len(v) > 0 {
		defaultValue = v[0]
	}
	value := os.Getenv(key)
	if value == "" {
		return defaultValue
	}
	return value
}

func createMap(values ...interface{}) (map[string]interface{}, error) {
	if len(values)%2 != 0 {
		return nil, errors.New("invalid map call")
	}
	dict := make(map[string]interface{}, len(values)/2)
	for i := 0; i < len(values); i += 2 {
		key, ok := values[i].(string)
		if !ok {
			return nil, errors.New("map keys must be strings")
		}
		dict[key] = values[i+1]
	}
	return dict, nil
}

func unmarshalJSONObject(data string) (map[string]interface{}, error) {
	var ret map[string]interface{}
	err := json.Unmarshal([]byte(data), &ret)
	return ret, err
}

func unmarshalJSONArray(data string) ([]interface{}, error) {
	var ret []interface{}
	err := json.Unmarshal([]byte(data), &ret)
	return ret, err
}

func reverse(values interface{}) interface{} {
	switch v := values.(type) {
	case []string:
		for left, right := 0, len(v)-1; left < right; left, right = left+1, right-1 {
			v[left], v[right] = v[right], v[left]
		}
	case KVPairs:
		for left, right := 0, len(v)-1; left < right; left, right = left+1, right-1 {
			v[left], v[right] = v[right], v[left]
		}
	}
	return values
}

type byLength []string

func (s byLength) Len() int           { return len(s) }
func (s byLength) Swap(i, j int)      { s[i], s[j] = s[j], s[i] }
func (s byLength) Less(i, j int) bool { return len(s[i]) < len(s[j]) }

type kvByLength KVPairs

func (s kvByLength) Len() int           { return len(s) }
func (s kvByLength) Swap(i, j int)      { s[i], s[j] = s[j], s[i] }
func (s kvByLength) Less(i, j int) bool { return len(s[i].Key) < len(s[j].Key) }

func seq(first, last int) []int {
	var arr []int
	for i := first; i <= last; i++ {
		arr = append(arr, i)
	}
	return arr
}

func isFileExist(fpath string) bool {
	if _, err := os.Stat(fpath); os.IsNotExist(err) {
		return false
	}
	return true
}

func funcMap(store Store) template.FuncMap {
	return template.FuncMap{
		"base": path.Base, "split": strings.Split, "json": unmarshalJSONObject,
		"jsonArray": unmarshalJSONArray, "dir": path.Dir, "map": createMap,
		"getenv": getenv, "join": strings.Join, "toUpper": strings.ToUpper,
		"toLower": strings.ToLower, "contains": strings.Contains, "replace": strings.Replace,
		"trimSuffix": strings.TrimSuffix, "fileExists": isFileExist,
		"base64Encode": func(data string) string { return base64.StdEncoding.EncodeToString([]byte(data)) },
		"base64Decode": func(data string) (string, error) {
			s, err := base64.StdEncoding.DecodeString(data)
			return string(s), err
		},
		"reverse":        reverse,
		"sortByLength":   func(v []string) []string { sort.Sort(byLength(v)); return v },
		"sortKVByLength": func(v KVPairs) KVPairs { sort.Sort(kvByLength(v)); return v },
		"parseBool":      strconv.ParseBool, "atoi": strconv.Atoi, "seq": seq,
		"add": func(a, b int) int { return a + b }, "sub": func(a, b int) int { return a - b },
		"mul": func(a, b int) int { return a * b }, "div": func(a, b int) int { return a / b },
		"mod":    func(a, b int) int { return a % b },
		"exists": store.Exists, "ls": store.List, "lsdir": store.ListDir, "get": store.Get,
		"gets": store.GetAll, "getv": store.GetValue, "getvs": store.GetAllValues,
	}
}

func main() {
	keysFile := flag.String("keys", "", "JSON object: full etcd key -> value")
	prefix := flag.String("prefix", "/", "the resource's prefix (confd's and the resource's joined)")
	watch := flag.String("watch", "/", "the resource's keys, comma-separated")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: render -keys FILE -prefix P -watch K1,K2 TEMPLATE")
		os.Exit(2)
	}
	raw, err := os.ReadFile(*keysFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	all := map[string]string{}
	if err := json.Unmarshal(raw, &all); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if !strings.HasPrefix(*prefix, "/") {
		*prefix = "/" + *prefix
	}
	store := Store{m: map[string]KVPair{}}
	for _, key := range strings.Split(*watch, ",") {
		wanted := path.Join(*prefix, key)
		for k, v := range all {
			if strings.HasPrefix(k, wanted) {
				stored := path.Join("/", strings.TrimPrefix(k, *prefix))
				store.m[stored] = KVPair{stored, v}
			}
		}
	}
	src := flag.Arg(0)
	tmpl, err := template.New(filepath.Base(src)).Funcs(funcMap(store)).ParseFiles(src)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := tmpl.Execute(os.Stdout, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

#!/usr/bin/env python3
"""Feature coverage of generated cases (reads xc_meta.json).  coverage.py CASES_DIR..."""
import collections, glob, json, os, sys
C = collections.Counter()
for root in sys.argv[1:]:
    for m in sorted(glob.glob(os.path.join(root, '*/xc_meta.json'))):
        d = json.load(open(m)); f = d['flags']
        r = json.load(open(m.replace('xc_meta.json', 'expected/result.json')))
        cj = json.load(open(m.replace('xc_meta.json', 'case.json')))
        N = f['N']; pol = cj['policy']
        C['cases'] += 1
        C['raters>0'] += d['R'] > 0
        C['given raters'] += 'raters' in cj
        C['no raters (no text / all m equal / given [])'] += d['R'] == 0
        C['rank policy, rank==N (keep all)'] += d['R'] > 0 and pol['kind'] == 'rank' and d['rank'] == N
        C['rank deficient (rank<min(R,N))'] += d['R'] > 0 and d['rank'] < min(d['R'], N)
        C['rank==0 with raters'] += d['R'] > 0 and d['rank'] == 0
        C['pruned>0'] += d['keep_count'] < N
        C['keep_count==0'] += d['keep_count'] == 0 and d['R'] > 0
        C['fixed keep>=N'] += pol['kind'] == 'fixed' and pol['keep'] >= N
        C['negative bias'] += pol['kind'] == 'rank' and pol['bias'] < 0
        C['recycled'] += bool(r['clusters'])
        C['c==1'] += len(r['clusters']) == 1
        C['c==2'] += len(r['clusters']) == 2
        C['c>=3'] += len(r['clusters']) >= 3
        C['c>=10'] += len(r['clusters']) >= 10
        C['rho exact ties'] += (d['n_rho_ties'] or 0) > 0
        C['rho*delta exact ties (centres)'] += (d['n_g_ties'] or 0) > 0
        C['keep boundary exact score tie'] += 'keep boundary score' in d['ties']
        C['recycle selection exact score tie'] += 'recycle selection score' in d['ties']
        C['nearest-centre exact distance tie'] += 'nearest-centre distance' in d['ties']
        C['earlier-centre order!=index ambiguity'] += d['earlier_centre_ambiguous']
        C['N==1'] += N == 1
        C['fp16 attn'] += f['dt_att'] == 'float16'
        C['fp16 attn with subnormals'] += f.get('fp16_subnormals', 0) > 0
        C['fp16 embeds'] += f['dt_emb'] == 'float16'
        C['fp16 hidden'] += f['dt_hid'] == 'float16'
        C['q/k'] += f['qk']
        C['q/k GQA (Hkv<H)'] += f['qk'] and f['Hkv'] < f['H']
        C['q/k duplicate keys'] += 'dup_keys' in f
        C['low-rank grid P'] += 'lowrank_K' in f
        C['prefix S==0'] += f['S'] == 0
        C['d==1'] += f['d'] == 1
for k, v in C.items():
    print(f'{k:42s} {v}')

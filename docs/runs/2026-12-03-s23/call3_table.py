# Session 23, call 3: the variants table of docs/benchmarks.md (run inside call3/).
import glob
def ours(f):
    d={}
    for l in open(f):
        if l.startswith('| OPT'):
            c=[x.strip() for x in l.strip().strip('|').split('|')]
            d[(c[0].split(' (')[0],int(c[1]))]=float(c[9].split()[0])
    return d
fs=['gemv4.log']+sorted(glob.glob('gemv4_*.log'))
ds=[ours(f) for f in fs]
print('| weight | rows | '+' | '.join(f[6:-4] or 'default' for f in fs)+' |')
for k in ds[0]:
    if k[1] in (16,32,64,128):
        print(f'| {k[0]} | {k[1]} | '+' | '.join(f'{d[k]:.3f}' for d in ds)+' |')

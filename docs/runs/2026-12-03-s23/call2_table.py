# Session 23, call 2: the side-by-side table of docs/benchmarks.md (run inside call2/).
import sys,re
def ours(f):
    d={}
    for l in open(f):
        if l.startswith('| OPT'):
            c=[x.strip() for x in l.strip().strip('|').split('|')]
            name=c[0].split(' (')[0]; nb=int(c[1])
            t=float(c[9].split()[0]); gbs=float(c[10])
            d[(name,nb)]=(t,gbs)
    return d
def marlin(f):
    d={}
    for l in open(f):
        if l.startswith('| OPT'):
            c=[x.strip() for x in l.strip().strip('|').split('|')]
            d[(c[0].split(' (')[0],int(c[1]))]=(float(c[3]),float(c[4]))
    return d
a=ours('gemv4.log'); b=ours('gemv4_GEMV4_GROUP=128.log'); m=marlin('marlin.log')
names=[]
for k in a:
    if k[0] not in names: names.append(k[0])
rows=[1,8,16,32,64]
print('| weight | rows | ours g64 ms (GB/s) | ours g128 ms (GB/s) | Marlin ms (GB/s) | Marlin/ours g64 time | g128 time | g64 GB/s ratio |')
print('|---|---|---|---|---|---|---|---|')
for n in names:
    for r in rows:
        if (n,r) not in m: continue
        x,y,z=a[(n,r)],b[(n,r)],m[(n,r)]
        print(f'| {n} | {r} | {x[0]:.3f} ({x[1]:.0f}) | {y[0]:.3f} ({y[1]:.0f}) | {z[0]:.3f} ({z[1]:.0f}) | {z[0]/x[0]:.2f} | {z[0]/y[0]:.2f} | {x[1]/z[1]:.2f} |')
